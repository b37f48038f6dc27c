//! The data directory either side keeps: made private when Runyard creates it, never changed
//! when it already exists (a shared `/tmp`-like directory must keep its mode), and held by one
//! process at a time through a lock file taken before anything else touches it.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "data dir {0} is in use by another runyard process; stop it or choose another data dir"
    )]
    InUse(PathBuf),
    #[error("cannot lock data dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist; an existing
/// directory is left exactly as it is.
pub fn create(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `dir` if needed and takes `<dir>/<name>` for this process, for as long as the
/// returned file lives. Another process holding it: `LockError::InUse`, at once.
pub fn lock(dir: &Path, name: &str) -> Result<File, LockError> {
    let io_err = |source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    };
    create(dir).map_err(io_err)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(name))
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LockError::InUse(dir.to_path_buf())),
        Err(TryLockError::Error(source)) => Err(io_err(source)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_dir_is_private_and_an_existing_one_keeps_its_mode() {
        let root = tempfile::tempdir().unwrap();
        let new = root.path().join("a/b");
        create(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        let shared = root.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        let held = lock(&shared, "x.lock").unwrap();
        assert_eq!(mode(&shared), 0o1777, "an existing dir keeps its mode");
        assert!(matches!(lock(&shared, "x.lock"), Err(LockError::InUse(_))));
        drop(held);
        lock(&shared, "x.lock").expect("free again once the holder is gone");
    }
}
