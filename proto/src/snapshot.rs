//! Snapshots: a local project directory as a tar archive, known by the sha256 of its bytes
//! (`snapshot:sha256:<hex>` in a spec's `repo`). The controller checks an archive when it is
//! uploaded and the agent checks it again before unpacking it (neither trusts the other's
//! check): relative paths made of plain names only, regular files, directories, and symlinks
//! whose target stays inside the tree; bounded in entries and unpacked size.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Most entries one snapshot may hold.
pub const MAX_ENTRIES: usize = 100_000;
/// Most bytes one snapshot may unpack to.
pub const MAX_UNPACKED: u64 = 4 << 30;

/// What an archive holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
}

/// The prefix of a snapshot's id in a spec's `repo`.
pub const PREFIX: &str = runyard_model::spec::SNAPSHOT_PREFIX;

/// `snapshot:sha256:<hex>` of an archive's sha256.
pub fn id_of(sha256_hex: &str) -> String {
    format!("{PREFIX}{sha256_hex}")
}

/// Checks every entry of the archive `r` reads. The message names the entry at fault.
pub fn check(r: impl Read) -> Result<Summary, String> {
    let mut archive = tar::Archive::new(r);
    let mut summary = Summary { files: 0, bytes: 0 };
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for (n, entry) in entries.enumerate() {
        let entry = entry.map_err(|e| format!("not a tar archive: {e}"))?;
        if n >= MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let path = entry
            .path()
            .map_err(|e| format!("an entry's path is unreadable: {e}"))?
            .into_owned();
        let shown = path.display().to_string();
        if !is_plain(&path) {
            return Err(format!("`{shown}`: paths must be relative, without `..`"));
        }
        let kind = entry.header().entry_type();
        if kind.is_file() {
            summary.files += 1;
            summary.bytes += entry.size();
            if summary.bytes > MAX_UNPACKED {
                return Err(format!("unpacks to more than {} GiB", MAX_UNPACKED >> 30));
            }
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| format!("`{shown}`: unreadable link: {e}"))?
                .ok_or_else(|| format!("`{shown}`: a symlink without a target"))?;
            if !stays_inside(&path, &target) {
                return Err(format!(
                    "`{shown}` links to `{}`, outside the project",
                    target.display()
                ));
            }
        } else if !kind.is_dir()
            && !kind.is_pax_global_extensions()
            && !kind.is_pax_local_extensions()
            && !kind.is_gnu_longname()
            && !kind.is_gnu_longlink()
        {
            return Err(format!(
                "`{shown}`: only files, directories and symlinks inside the project"
            ));
        }
    }
    Ok(summary)
}

/// Unpacks a checked archive into `dir` (which must exist), keeping each file's executable bit.
pub fn unpack(r: impl Read, dir: &Path) -> Result<Summary, String> {
    let mut archive = tar::Archive::new(r);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(false);
    archive.set_overwrite(true);
    let mut summary = Summary { files: 0, bytes: 0 };
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if !is_plain(&path) {
            return Err(format!(
                "`{}`: not a path inside the project",
                path.display()
            ));
        }
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| e.to_string())?
                .ok_or("a symlink without a target")?;
            if !stays_inside(&path, &target) {
                return Err(format!("`{}` links outside the project", path.display()));
            }
        }
        if kind.is_file() {
            summary.files += 1;
            summary.bytes += entry.size();
        }
        // `unpack_in` refuses anything that would land outside `dir`, symlinked parents
        // included.
        let inside = entry
            .unpack_in(dir)
            .map_err(|e| format!("`{}`: {e}", path.display()))?;
        if !inside {
            return Err(format!("`{}`: outside the project", path.display()));
        }
    }
    Ok(summary)
}

fn is_plain(p: &Path) -> bool {
    p.components().next().is_some()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Whether symlink `link` (a path in the tree) pointing at `target` resolves inside the tree.
pub fn stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut at: PathBuf = link.parent().map(Path::to_path_buf).unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(n) => at.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !at.pop() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// A header whose path field says `path` as is (the builder refuses `..` itself).
    fn raw_file(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
    }

    #[test]
    fn a_project_checks_and_unpacks() {
        let a = archive(|b| {
            file(b, "MLproject", b"name: x\n");
            file(b, "src/train.py", b"print(1)\n");
            link(b, "src/link.py", "train.py");
            link(b, "up.py", "src/../MLproject");
        });
        assert_eq!(
            check(&a[..]).unwrap(),
            Summary {
                files: 2,
                bytes: 17
            }
        );
        let dir = tempfile::tempdir().unwrap();
        unpack(&a[..], dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("src/link.py")).unwrap(),
            "print(1)\n"
        );
    }

    #[test]
    fn escapes_are_refused_by_both_sides() {
        for (a, why) in [
            (archive(|b| raw_file(b, "../x")), "without `..`"),
            (archive(|b| raw_file(b, "/etc/x")), "relative"),
            (
                archive(|b| link(b, "l", "/etc/passwd")),
                "outside the project",
            ),
            (
                archive(|b| link(b, "a/l", "../../x")),
                "outside the project",
            ),
        ] {
            let e = check(&a[..]).unwrap_err();
            assert!(e.contains(why), "{e}");
            let dir = tempfile::tempdir().unwrap();
            assert!(unpack(&a[..], dir.path()).is_err());
        }
        let dev = archive(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Char);
            h.set_size(0);
            b.append_data(&mut h, "tty", &[][..]).unwrap();
        });
        assert!(check(&dev[..]).unwrap_err().contains("only files"));
        assert!(check(&b"not a tar archive at all, just text"[..]).is_err());
    }
}
