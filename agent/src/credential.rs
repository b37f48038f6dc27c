//! The agent's own credential: a random secret made once, kept in `<data_dir>/agent.credential`
//! with mode 0600, and sent with every call to the controller.
//!
//! The first session under a name enrols the credential (with the join token); the controller
//! keeps only its sha256. From then on the name opens sessions and uploads checkpoints only with
//! this file, so a second agent cannot take the name over. Made here, before the first connect,
//! rather than handed out by the controller: an agent that dies mid-enrolment still has the
//! credential the controller recorded.

use std::io;
use std::path::Path;

pub const CREDENTIAL_FILE: &str = "agent.credential";
const PREFIX: &str = "ryc_";

/// Reads the credential from `data_dir`, creating it (0600) the first time.
pub fn load_or_create(data_dir: &Path) -> io::Result<String> {
    runyard_proto::secret::ensure(&data_dir.join(CREDENTIAL_FILE), PREFIX)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn kept_in_the_data_dir_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = load_or_create(dir.path()).unwrap();
        assert!(c.starts_with(PREFIX));
        assert_eq!(load_or_create(dir.path()).unwrap(), c);
        let meta = std::fs::metadata(dir.path().join(CREDENTIAL_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
