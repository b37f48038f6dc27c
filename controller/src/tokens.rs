//! API tokens: an admin token for users and a join token for agents, created at first start in
//! the data dir with mode 0600 and read back on every start. Agents' own credentials are never
//! stored: only their sha256 (`credential_hash`), compared in constant time.
//!
//! `agent.token` holds the join token as agents are given it: `RY1<CA fingerprint>::<secret>`
//! when the controller serves TLS, the secret alone when it does not (`runyard_proto::join`).
//! The secret never changes; the prefix is rewritten when the CA does (or TLS is turned off).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use runyard_proto::{Fingerprint, JoinToken};

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const AGENT_TOKEN_FILE: &str = "agent.token";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// For users: CLI, HTTP API, web page.
    pub admin: String,
    /// For agents joining over gRPC: the secret part of the join token, which agents present.
    pub agent: String,
}

/// Reads the tokens from `data_dir`, creating any that is missing (and the dir, private, if it
/// does not exist; an existing dir keeps its mode: the token files are 0600 whatever it is).
pub fn ensure_tokens(data_dir: &Path) -> std::io::Result<Tokens> {
    runyard_proto::datadir::create(data_dir)?;
    Ok(Tokens {
        admin: runyard_proto::secret::ensure(&data_dir.join(ADMIN_TOKEN_FILE), "rya_")?,
        agent: join_token(data_dir)?.secret,
    })
}

/// The join token in `agent.token` (created with a fresh secret the first time).
fn join_token(data_dir: &Path) -> std::io::Result<JoinToken> {
    let path = data_dir.join(AGENT_TOKEN_FILE);
    let raw = runyard_proto::secret::ensure(&path, "ryj_")?;
    raw.parse::<JoinToken>().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Makes `agent.token` carry `ca` (the fingerprint agents pin, `None` without TLS) and returns
/// the join token as agents must be given it. The secret is kept; the file is rewritten
/// (atomically, 0600) only when its prefix changes.
pub fn publish_join_token(data_dir: &Path, ca: Option<Fingerprint>) -> std::io::Result<JoinToken> {
    let stored = join_token(data_dir)?;
    let token = JoinToken::new(ca, stored.secret.clone());
    if token != stored {
        let path = data_dir.join(AGENT_TOKEN_FILE);
        let tmp = path.with_extension("tmp");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
    }
    Ok(token)
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
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

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

    #[test]
    fn the_join_token_carries_the_ca_and_keeps_its_secret() {
        let dir = tempfile::tempdir().unwrap();
        let plain = ensure_tokens(dir.path()).unwrap();
        let file = || fs::read_to_string(dir.path().join(AGENT_TOKEN_FILE)).unwrap();
        assert_eq!(
            file().trim(),
            plain.agent,
            "an old data dir: the secret alone"
        );

        let ca = Fingerprint::of(b"ca");
        let token = publish_join_token(dir.path(), Some(ca)).unwrap();
        assert_eq!(token.secret, plain.agent);
        assert_eq!(file().trim(), format!("RY1{ca}::{}", plain.agent));
        let mode = fs::metadata(dir.path().join(AGENT_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Read back on the next start: the same secret, whatever the prefix.
        assert_eq!(ensure_tokens(dir.path()).unwrap(), plain);

        // TLS turned off: the prefix goes, the secret stays.
        let token = publish_join_token(dir.path(), None).unwrap();
        assert_eq!(token.to_string(), plain.agent);
        assert_eq!(file().trim(), plain.agent);

        fs::write(dir.path().join(AGENT_TOKEN_FILE), "RY1zz::x\n").unwrap();
        let e = ensure_tokens(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(AGENT_TOKEN_FILE) && e.contains("fingerprint"),
            "{e}"
        );
    }
}
