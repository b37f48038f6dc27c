//! API tokens: an admin token for users and a join token for agents, created at first start in
//! the data dir with mode 0600 and read back on every start. Agents' own credentials are never
//! stored: only their sha256 (`credential_hash`), compared in constant time.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const AGENT_TOKEN_FILE: &str = "agent.token";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// For users: CLI, HTTP API, web page.
    pub admin: String,
    /// For agents joining over gRPC.
    pub agent: String,
}

/// Reads the tokens from `data_dir`, creating any that is missing.
/// A data dir this creates is made 0700; an existing one keeps its mode (`runyard up` makes its
/// own 0711, so its agent's jobs can pass through to `<data dir>/agent`).
pub fn ensure_tokens(data_dir: &Path) -> std::io::Result<Tokens> {
    if !data_dir.exists() {
        fs::create_dir_all(data_dir)?;
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(Tokens {
        admin: runyard_proto::secret::ensure(&data_dir.join(ADMIN_TOKEN_FILE), "rya_")?,
        agent: runyard_proto::secret::ensure(&data_dir.join(AGENT_TOKEN_FILE), "ryj_")?,
    })
}

/// What the controller keeps of an agent's credential: its sha256, in hex.
pub fn credential_hash(credential: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(credential.as_bytes()))
}

/// Constant-time comparison, so a wrong token leaks nothing through timing.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = ensure_tokens(dir.path()).unwrap();
        let t2 = ensure_tokens(dir.path()).unwrap();
        assert_eq!(t1, t2);
        assert_ne!(t1.admin, t1.agent);
        let mode = fs::metadata(dir.path().join(ADMIN_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(token_eq(&t1.admin, &t2.admin));
        assert!(!token_eq(&t1.admin, &t1.agent));
    }
}
