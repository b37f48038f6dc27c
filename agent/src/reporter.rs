//! The Lightning reporter: the Python distribution `runyard_reporter` (sources in
//! `agent/reporter/`), embedded in the agent binary and installed into `<data dir>/reporter/`
//! at start; its directory is prepended to every job's `PYTHONPATH`. Lightning finds its callback
//! through the `callbacks_factory` entry points; the callback writes report lines (the format of
//! `runyard_model::report`) to the file named by `RUNYARD_REPORT_FILE`.
//!
//! Invariants: after [`install`] the directory holds exactly one `runyard_reporter` distribution,
//! the embedded one (an older version's files and `.dist-info` are removed, so Lightning never
//! adds two callbacks); each file is replaced by a rename, so a reader sees the old file or the
//! new one, never a partial one. Installing twice is harmless.

use std::path::{Path, PathBuf};

/// Version of the embedded distribution (its `.dist-info` directory name carries it).
pub const VERSION: &str = "0.1.0";

/// The package directory inside the install directory.
const PACKAGE: &str = "runyard_reporter";
/// The metadata directory inside the install directory.
const DIST_INFO: &str = "runyard_reporter-0.1.0.dist-info";

/// The embedded files: path relative to the install directory, contents.
const FILES: &[(&str, &str)] = &[
    (
        "runyard_reporter/__init__.py",
        include_str!("../reporter/runyard_reporter/__init__.py"),
    ),
    (
        "runyard_reporter/_lightning.py",
        include_str!("../reporter/runyard_reporter/_lightning.py"),
    ),
    (
        "runyard_reporter-0.1.0.dist-info/METADATA",
        include_str!("../reporter/runyard_reporter-0.1.0.dist-info/METADATA"),
    ),
    (
        "runyard_reporter-0.1.0.dist-info/entry_points.txt",
        include_str!("../reporter/runyard_reporter-0.1.0.dist-info/entry_points.txt"),
    ),
    (
        "runyard_reporter-0.1.0.dist-info/top_level.txt",
        include_str!("../reporter/runyard_reporter-0.1.0.dist-info/top_level.txt"),
    ),
    (
        "runyard_reporter-0.1.0.dist-info/RECORD",
        include_str!("../reporter/runyard_reporter-0.1.0.dist-info/RECORD"),
    ),
];

/// Writes the embedded reporter distribution into `dir` (created if missing) and returns the
/// absolute directory to prepend to a job's `PYTHONPATH`.
///
/// Blocking file I/O: call it from `spawn_blocking` in async code.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    let dir = std::path::absolute(dir)?;
    std::fs::create_dir_all(dir.join(PACKAGE))?;
    std::fs::create_dir_all(dir.join(DIST_INFO))?;
    remove_other_versions(&dir)?;
    for sub in [PACKAGE, DIST_INFO] {
        remove_unknown_files(&dir, sub)?;
    }
    for (rel, contents) in FILES {
        write_replacing(&dir.join(rel), contents.as_bytes())?;
    }
    Ok(dir)
}

/// `PYTHONPATH` for a job: `reporter` first, then the job's own value (if any and not empty).
pub fn pythonpath(reporter: &Path, existing: Option<&str>) -> String {
    match existing.filter(|s| !s.is_empty()) {
        Some(rest) => format!("{}:{rest}", reporter.display()),
        None => reporter.display().to_string(),
    }
}

/// Removes `.dist-info` directories of other `runyard_reporter` versions: each one would
/// register the entry points again.
fn remove_other_versions(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = name.starts_with("runyard_reporter-")
            && name.ends_with(".dist-info")
            && name != DIST_INFO;
        if stale {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes what `dir/sub` holds that is not embedded, except Python's bytecode cache (Python
/// revalidates it against the sources).
fn remove_unknown_files(dir: &Path, sub: &str) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir.join(sub))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "__pycache__" {
            continue;
        }
        let rel = format!("{sub}/{name}");
        if !FILES.iter().any(|(p, _)| *p == rel) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    let result = if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `path` through a temporary sibling and a rename; skips the write when the contents are
/// already right (so Python's bytecode cache stays valid).
fn write_replacing(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python(pythonpath: &Path, code: &str) -> std::process::Output {
        std::process::Command::new("python3")
            .args(["-c", code])
            .env("PYTHONPATH", pythonpath)
            .env_remove("RUNYARD_REPORT_FILE")
            .output()
            .expect("python3 runs")
    }

    #[test]
    fn installed_distribution_is_importable_and_registers_entry_points() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = install(&tmp.path().join("reporter")).unwrap();
        assert!(dir.is_absolute());
        for (rel, contents) in FILES {
            assert_eq!(std::fs::read_to_string(dir.join(rel)).unwrap(), *contents);
        }
        let out = python(
            &dir,
            r#"
import importlib.metadata as md, runyard_reporter as r
for group in ("lightning.pytorch.callbacks_factory", "pytorch_lightning.callbacks_factory"):
    print(group, sorted((e.name, e.value, e.dist.version) for e in md.entry_points(group=group)))
print("version", md.version("runyard-reporter"), r.__version__)
print("disabled", r.lightning_callbacks(), r.pytorch_lightning_callbacks(), r.metrics({"a": 1}))
"#,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(
                "lightning.pytorch.callbacks_factory [('runyard', 'runyard_reporter:lightning_callbacks', '0.1.0')]"
            ),
            "{stdout}"
        );
        assert!(
            stdout.contains(
                "pytorch_lightning.callbacks_factory [('runyard', 'runyard_reporter:pytorch_lightning_callbacks', '0.1.0')]"
            ),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("version {VERSION} {VERSION}")),
            "{stdout}"
        );
        assert!(stdout.contains("disabled [] [] False"), "{stdout}");
    }

    #[test]
    fn reinstall_replaces_files_and_removes_other_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = install(tmp.path()).unwrap();
        let init = dir.join("runyard_reporter/__init__.py");
        std::fs::write(&init, "raise SystemExit('tampered')").unwrap();
        std::fs::write(dir.join("runyard_reporter/old_module.py"), "").unwrap();
        let old = dir.join("runyard_reporter-0.0.9.dist-info");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("entry_points.txt"), "").unwrap();
        std::fs::create_dir_all(dir.join("runyard_reporter/__pycache__")).unwrap();
        std::fs::write(dir.join("unrelated.txt"), "kept").unwrap();

        assert_eq!(install(tmp.path()).unwrap(), dir);
        assert_eq!(std::fs::read_to_string(&init).unwrap(), FILES[0].1);
        assert!(!dir.join("runyard_reporter/old_module.py").exists());
        assert!(!old.exists());
        assert!(dir.join("runyard_reporter/__pycache__").is_dir());
        assert!(dir.join("unrelated.txt").exists());
        let leftovers: Vec<_> = walk(&dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn pythonpath_puts_the_reporter_first() {
        let r = Path::new("/data/reporter");
        assert_eq!(pythonpath(r, None), "/data/reporter");
        assert_eq!(pythonpath(r, Some("")), "/data/reporter");
        assert_eq!(pythonpath(r, Some("/a:/b")), "/data/reporter:/a:/b");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }
}
