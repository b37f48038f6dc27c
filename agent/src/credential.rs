//! The agent's own credential: a random secret made once, kept in `<data_dir>/agent.credential`
//! with mode 0600, and sent with every call to the controller.
//!
//! The first session under a name enrols the credential (with the join token); the controller
//! keeps only its sha256. From then on the name opens sessions and uploads checkpoints only with
//! this file, so a second agent cannot take the name over. Made here, before the first connect,
//! rather than handed out by the controller: an agent that dies mid-enrolment still has the
//! credential the controller recorded.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngExt;

pub const CREDENTIAL_FILE: &str = "agent.credential";
const PREFIX: &str = "ryc_";

/// Reads the credential from `data_dir`, creating it (0600) the first time.
pub fn load_or_create(data_dir: &Path) -> io::Result<String> {
    let path = data_dir.join(CREDENTIAL_FILE);
    match fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            // A copy made with a looser mode is tightened: it opens this agent's name.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            return Ok(s.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut rng = rand::rng();
    let body: String = (0..43)
        .map(|_| {
            const ALPHABET: &[u8] =
                b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
            ALPHABET[rng.random_range(0..ALPHABET.len())] as char
        })
        .collect();
    let credential = format!("{PREFIX}{body}");
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(credential.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c1 = load_or_create(dir.path()).unwrap();
        let c2 = load_or_create(dir.path()).unwrap();
        assert_eq!(c1, c2);
        assert!(c1.starts_with(PREFIX) && c1.len() > 40);
        let path = dir.path().join(CREDENTIAL_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), c1);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "tightened");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), c1);
    }
}
