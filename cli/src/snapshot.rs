//! A local project directory as a snapshot (`runyard submit --repo .`): its files as a tar
//! archive, uploaded to the controller, which names it by its sha256. In a git checkout the files
//! are what git would commit now (tracked files as they are in the working tree, plus untracked
//! files that are not ignored), so uncommitted changes run; elsewhere every file but `.git/` and
//! `__pycache__/`. The archive is deterministic: the same tree gives the same id.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The most the client reads into one archive; the controller's own limit (64 MiB by default)
/// is usually lower and is the one that answers.
pub const CLIENT_LIMIT: u64 = 1 << 30;

/// Whether a `--repo` value names a local directory rather than a git URL.
pub fn is_local_dir(repo: &str) -> bool {
    !repo.contains("://") && !repo.starts_with("snapshot:") && Path::new(repo).is_dir()
}

pub struct Archive {
    pub bytes: Vec<u8>,
    pub files: usize,
    /// The checkout's HEAD, when the directory is in one.
    pub commit: Option<String>,
}

fn git(dir: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// The files to archive, relative to `dir`, sorted.
fn files_of(dir: &Path) -> Result<(Vec<PathBuf>, Option<String>), String> {
    if git(dir, &["rev-parse", "--show-toplevel"]).is_some() {
        let listed = git(
            dir,
            &[
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
                "--",
                ".",
            ],
        )
        .ok_or_else(|| format!("`git ls-files` failed in {}", dir.display()))?;
        let mut files: Vec<PathBuf> = listed
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
            // Tracked but deleted in the working tree: not part of what runs.
            .filter(|p| dir.join(p).symlink_metadata().is_ok())
            .collect();
        files.sort();
        files.dedup();
        let commit = git(dir, &["rev-parse", "HEAD"])
            .map(|h| String::from_utf8_lossy(&h).trim().to_string());
        return Ok((files, commit));
    }
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = std::fs::read_dir(dir.join(&rel))
            .map_err(|e| format!("cannot read {}: {e}", dir.join(&rel).display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name();
            let path = rel.join(&name);
            let kind = entry.file_type().map_err(|e| e.to_string())?;
            if kind.is_dir() {
                if name != ".git" && name != "__pycache__" {
                    stack.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok((files, None))
}

/// Archives `dir`.
pub fn archive(dir: &Path) -> Result<Archive, String> {
    use std::os::unix::fs::PermissionsExt;
    let (files, commit) = files_of(dir)?;
    let mut total = 0u64;
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for rel in &files {
        let full = dir.join(rel);
        let meta = full
            .symlink_metadata()
            .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(|e| e.to_string())?;
            if !runyard_proto::snapshot::stays_inside(rel, &target) {
                return Err(format!(
                    "{} links to {}, outside the project: a snapshot holds only the project's own files",
                    rel.display(),
                    target.display()
                ));
            }
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, rel, &target)
                .map_err(|e| format!("{}: {e}", rel.display()))?;
        } else if meta.is_file() {
            total += meta.len();
            if total > CLIENT_LIMIT {
                return Err(format!(
                    "{} holds more than {} of files: too big for a snapshot; run it from its git repository, or leave large files out (.gitignore)",
                    dir.display(),
                    runyard_model::size::format(CLIENT_LIMIT)
                ));
            }
            let executable = meta.permissions().mode() & 0o111 != 0;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(if executable { 0o755 } else { 0o644 });
            h.set_size(meta.len());
            let f = std::fs::File::open(&full)
                .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
            b.append_data(&mut h, rel, f)
                .map_err(|e| format!("{}: {e}", rel.display()))?;
        }
    }
    let bytes = b.into_inner().map_err(|e| e.to_string())?;
    Ok(Archive {
        bytes,
        files: files.len(),
        commit,
    })
}
