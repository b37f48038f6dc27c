//! `runyard download ID`: the job's best checkpoint, streamed to a local file.
//!
//! Invariants: the destination only ever appears complete and verified. The bytes go to a
//! hidden temp file in the destination's directory while their sha256 is computed; only when
//! it equals the controller's `x-checksum-sha256` (and the length its `content-length`) is the
//! temp file synced and renamed into place, and never over an existing file without `--force`
//! (checked before the download and again, atomically, by the rename). On any failure, or
//! Ctrl-C, the temp file is removed and nothing else was touched.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;

use super::{CommandError, client_for};
use crate::args::DownloadArgs;
use crate::client::{Checkpoint, ClientError};
use crate::output;

/// A download that receives nothing for this long is abandoned.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A checkpoint saved in place.
#[derive(Debug)]
struct Saved {
    path: PathBuf,
    size: u64,
    sha256: String,
}

/// `runyard download ID [-o FILE] [--force]`.
pub async fn download(args: DownloadArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    let mut checkpoint = client.checkpoint(&args.id).await?;
    let dest = destination(
        args.output.as_deref(),
        checkpoint.file_name.as_deref(),
        &args.id,
    );
    if !args.force && tokio::fs::symlink_metadata(&dest).await.is_ok() {
        return Err(CommandError::Exists(dest));
    }
    if checkpoint.sha256.is_none() {
        eprintln!("warning: the controller sent no checksum; the download is not verified");
    }
    let saved = tokio::select! {
        saved = save(&mut checkpoint, dest, args.force) => saved?,
        _ = tokio::signal::ctrl_c() => return Err(CommandError::Interrupted),
    };
    if args.client.json {
        let body = serde_json::json!({
            "path": saved.path.display().to_string(),
            "size": saved.size,
            "sha256": saved.sha256,
        });
        output::write_json(body.to_string().as_bytes()).map_err(CommandError::Stdout)?;
    } else {
        let line = format!(
            "saved {}, {}\n",
            saved.path.display(),
            output::size(saved.size)
        );
        output::write_stdout(line.as_bytes()).map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `-o` as given, or the checkpoint's name inside it when it is a directory; without `-o`,
/// the checkpoint's name (else `<id>.ckpt`) in the current directory.
fn destination(output: Option<&Path>, file_name: Option<&str>, id: &str) -> PathBuf {
    let name = || {
        file_name.map(str::to_string).unwrap_or_else(|| {
            let safe: String = id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("{safe}.ckpt")
        })
    };
    match output {
        Some(dir) if dir.is_dir() => dir.join(name()),
        Some(path) => path.to_path_buf(),
        None => PathBuf::from(name()),
    }
}

/// Streams the body into a temp file beside `dest`, verifies it and moves it into place.
async fn save(
    checkpoint: &mut Checkpoint,
    dest: PathBuf,
    force: bool,
) -> Result<Saved, CommandError> {
    let save_error = |path: &Path, e: &dyn std::fmt::Display| CommandError::Save {
        path: path.to_path_buf(),
        cause: e.to_string(),
    };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(
        ".{}.",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let temp_dir = dir.clone();
    let temp = tokio::task::spawn_blocking(move || {
        tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".part")
            // An ordinary file's mode (the umask applies), not a temp file's 0600.
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(&temp_dir)
    })
    .await
    .map_err(|_| CommandError::Panicked("download"))?
    .map_err(|e| save_error(&dir, &e))?;
    // From here the temp file is removed when `temp_path` is dropped, on every error path.
    let (file, temp_path) = temp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    loop {
        let chunk = tokio::time::timeout(STALL_TIMEOUT, checkpoint.chunk())
            .await
            .map_err(|_| ClientError::Body {
                url: checkpoint.url.clone(),
                cause: format!("no data for {}s", STALL_TIMEOUT.as_secs()),
            })??;
        let Some(chunk) = chunk else { break };
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| save_error(&temp_path, &e))?;
    }
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = checkpoint.size.filter(|&n| n != size) {
        return Err(CommandError::Truncated {
            expected,
            received: size,
        });
    }
    if let Some(expected) = checkpoint.sha256.as_ref().filter(|&e| *e != sha256) {
        return Err(CommandError::Checksum {
            expected: expected.clone(),
            actual: sha256,
        });
    }
    file.flush().await.map_err(|e| save_error(&temp_path, &e))?;
    file.sync_all()
        .await
        .map_err(|e| save_error(&temp_path, &e))?;
    drop(file);
    let target = dest.clone();
    tokio::task::spawn_blocking(move || persist(temp_path, &target, force))
        .await
        .map_err(|_| CommandError::Panicked("download"))??;
    Ok(Saved {
        path: dest,
        size,
        sha256,
    })
}

/// Renames the temp file to `dest`; without `force` only if `dest` does not exist (atomic).
fn persist(temp: TempPath, dest: &Path, force: bool) -> Result<(), CommandError> {
    let result = if force {
        temp.persist(dest)
    } else {
        temp.persist_noclobber(dest)
    };
    // A failed persist hands the temp path back; dropping it removes the file.
    result.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            CommandError::Exists(dest.to_path_buf())
        } else {
            CommandError::Save {
                path: dest.to_path_buf(),
                cause: e.error.to_string(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_defaults_to_the_checkpoint_name_here() {
        assert_eq!(
            destination(None, Some("best.ckpt"), "01J"),
            PathBuf::from("best.ckpt")
        );
        assert_eq!(
            destination(None, None, "01J/../x"),
            PathBuf::from("01J____x.ckpt")
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            destination(Some(dir.path()), Some("best.ckpt"), "01J"),
            dir.path().join("best.ckpt")
        );
        let file = dir.path().join("mine.pt");
        assert_eq!(destination(Some(&file), Some("best.ckpt"), "01J"), file);
    }

    #[test]
    fn persist_never_replaces_a_file_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("best.ckpt");
        std::fs::write(&dest, "old").unwrap();
        let temp = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        std::fs::write(temp.path(), "new").unwrap();
        let temp_file = temp.path().to_path_buf();
        let e = persist(temp.into_temp_path(), &dest, false).unwrap_err();
        assert!(matches!(e, CommandError::Exists(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "old");
        assert!(!temp_file.exists(), "the temp file is removed");

        let temp = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        std::fs::write(temp.path(), "new").unwrap();
        persist(temp.into_temp_path(), &dest, true).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
