//! Secrets either side keeps on disk: the controller's tokens (admin, agent join token) and each
//! agent's own credential. Random, alphanumeric, written atomically with mode 0600, and read back
//! on every start; a copy found with a looser mode is tightened.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngExt;

/// Random characters after the prefix (62 symbols: about 238 bits).
const LEN: usize = 40;

/// Reads the secret at `path`, creating it (`prefix` + random characters) the first time.
pub fn ensure(path: &Path, prefix: &str) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            return Ok(s.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret = random(prefix);
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(secret)
}

/// A new secret: `prefix` and random alphanumeric characters.
pub fn random(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    let body: String = (0..LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let s1 = ensure(&path, "ryx_").unwrap();
        assert_eq!(ensure(&path, "ryx_").unwrap(), s1);
        assert!(s1.starts_with("ryx_") && s1.len() == 4 + LEN);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(ensure(&path, "ryx_").unwrap(), s1);
        assert_eq!(mode(&path), 0o600, "tightened");
        assert_ne!(ensure(&dir.path().join("t"), "ryx_").unwrap(), s1);
    }
}
