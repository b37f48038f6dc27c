//! Python environments built for real from PyPI, with uv and with pip.
//!
//! uv: `pip install uv` puts it on PATH. Without it the uv tests fail when `CI` is set and are
//! skipped (with a message) otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runyard_agent::pyenv::{EnvBuilder, EnvError, REQUIREMENTS_FILE, VENV_DIR};

/// Installs from PyPI take seconds; bound them anyway.
const LIMIT: Duration = Duration::from_secs(300);
const MISSING: &str = "this-package-does-not-exist-runyard==1.0";

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn python() -> PathBuf {
    on_path("python3").expect("python3 on PATH")
}

/// uv's path, or `None` to skip (only outside CI).
fn uv() -> Option<PathBuf> {
    match on_path("uv") {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("uv is not on PATH and CI is set: install it with `pip install uv`")
        }
        None => {
            eprintln!("SKIPPED: uv is not on PATH (install it with `pip install uv`)");
            None
        }
    }
}

/// Runs `code` with `python`, returning stdout; panics with stderr on failure.
fn run_python(python: &Path, code: &str) -> String {
    let out = std::process::Command::new(python)
        .args(["-c", code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} -c {code:?}: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn no_requirements_means_the_agent_python_and_no_venv() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    std::fs::create_dir_all(&job).unwrap();
    for b in [
        EnvBuilder::new(python(), None, tmp.path().join("cache")),
        EnvBuilder::pip(python()),
    ] {
        let py = b.prepare(&job, &[], None).await.unwrap();
        assert_eq!(py, python());
    }
    assert!(
        std::fs::read_dir(&job).unwrap().next().is_none(),
        "job dir untouched"
    );
    assert!(!tmp.path().join("cache").exists());
}

#[tokio::test]
async fn uv_installs_requirements_and_a_requirements_file() {
    let Some(uv) = uv() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("uv-cache");
    let b = EnvBuilder::new(python(), Some(uv), cache.clone());
    assert_eq!(b.installer(), "uv");
    let job = tmp.path().join("job");
    write_file(&job.join("src/requirements.txt"), "idna==3.7\n");
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let py = tokio::time::timeout(
        LIMIT,
        b.prepare_logged(
            &job,
            &["six==1.16.0".to_string()],
            &[job.join("src/requirements.txt")],
            Some(tx),
        ),
    )
    .await
    .expect("uv within the time limit")
    .unwrap();
    assert_eq!(py, job.join(VENV_DIR).join("bin/python"));
    assert_eq!(
        run_python(
            &py,
            "import six, idna; print(six.__version__, idna.__version__)"
        ),
        "1.16.0 3.7"
    );
    assert_eq!(
        std::fs::read_to_string(job.join(REQUIREMENTS_FILE)).unwrap(),
        "six==1.16.0\n"
    );
    let mut lines = Vec::new();
    while let Ok(batch) = rx.try_recv() {
        lines.extend(batch);
    }
    assert!(
        lines.iter().any(|l| l.contains("six")),
        "installer lines forwarded: {lines:?}"
    );

    // The venv is hardlinked from the shared cache.
    let six = run_python(&py, "import six; print(six.__file__)");
    assert!(six.starts_with(job.to_str().unwrap()), "{six}");
    assert!(
        std::fs::metadata(&six).unwrap().nlink() >= 2,
        "{six} not hardlinked"
    );
    assert!(cache.is_dir());

    // A second prepare replaces the venv with a fresh one.
    std::fs::write(job.join(VENV_DIR).join("marker"), "x").unwrap();
    let py2 = tokio::time::timeout(LIMIT, b.prepare(&job, &["six==1.16.0".to_string()], None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(py2, py);
    assert!(!job.join(VENV_DIR).join("marker").exists());
    assert_eq!(
        run_python(&py, "import six; print(six.__version__)"),
        "1.16.0"
    );
}

#[tokio::test]
async fn pip_installs_requirements() {
    let tmp = tempfile::tempdir().unwrap();
    let b = EnvBuilder::pip(python());
    assert_eq!(b.installer(), "pip");
    let job = tmp.path().join("job");
    std::fs::create_dir_all(&job).unwrap();
    let py = tokio::time::timeout(LIMIT, b.prepare(&job, &["six==1.16.0".to_string()], None))
        .await
        .expect("pip within the time limit")
        .unwrap();
    assert_eq!(py, job.join(VENV_DIR).join("bin/python"));
    assert_eq!(
        run_python(&py, "import six; print(six.__version__)"),
        "1.16.0"
    );
    // The agent's own interpreter is left alone.
    let base = run_python(&python(), "import sys; print(sys.prefix)");
    let venv = run_python(&py, "import sys; print(sys.prefix)");
    assert_ne!(base, venv);
}

async fn expect_unresolvable(b: &EnvBuilder) {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    std::fs::create_dir_all(&job).unwrap();
    let e = tokio::time::timeout(LIMIT, b.prepare(&job, &[MISSING.to_string()], None))
        .await
        .expect("installer within the time limit")
        .unwrap_err();
    match &e {
        EnvError::Install {
            installer, output, ..
        } => {
            assert_eq!(*installer, b.installer());
            assert!(
                output.contains("this-package-does-not-exist-runyard"),
                "installer's message kept: {output}"
            );
            assert!(output.len() <= 4096 + 3, "trimmed: {}", output.len());
        }
        other => panic!("expected an install error, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(b.installer()), "{msg}");
    assert!(msg.contains("this-package-does-not-exist-runyard"), "{msg}");
}

#[tokio::test]
async fn unresolvable_requirement_with_uv_gives_uvs_message() {
    let Some(uv) = uv() else { return };
    let tmp = tempfile::tempdir().unwrap();
    expect_unresolvable(&EnvBuilder::new(
        python(),
        Some(uv),
        tmp.path().join("cache"),
    ))
    .await;
}

#[tokio::test]
async fn unresolvable_requirement_with_pip_gives_pips_message() {
    expect_unresolvable(&EnvBuilder::pip(python())).await;
}

#[tokio::test]
async fn a_missing_uv_binary_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let b = EnvBuilder::new(
        python(),
        Some(tmp.path().join("no-uv")),
        tmp.path().join("cache"),
    );
    let e = b
        .prepare(tmp.path(), &["six".to_string()], None)
        .await
        .unwrap_err();
    assert!(matches!(e, EnvError::Spawn { .. }), "{e}");
    assert!(e.to_string().contains("no-uv"), "{e}");
}

fn write_file(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Jobs with the same requirements share one environment, built once with its bytecode
/// compiled; requirements that point into a checkout still get a venv of their own.
#[tokio::test]
async fn equal_requirements_share_one_compiled_environment() {
    let Some(uv) = uv() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let envs = tmp.path().join("envs");
    let b =
        EnvBuilder::new(python(), Some(uv), tmp.path().join("uv-cache")).shared_in(envs.clone());
    let (job1, job2) = (tmp.path().join("j1"), tmp.path().join("j2"));
    for j in [&job1, &job2] {
        std::fs::create_dir_all(j).unwrap();
    }
    let reqs = ["six==1.16.0".to_string()];
    let first = tokio::time::timeout(LIMIT, b.prepare(&job1, &reqs, None))
        .await
        .unwrap()
        .unwrap();
    assert!(first.starts_with(&envs), "{}", first.display());
    assert!(!job1.join(VENV_DIR).exists(), "no venv of the job's own");
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(LIMIT, b.prepare(&job2, &reqs, None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, first);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Compiled once, when built.
    let six = run_python(&first, "import six; print(six.__file__)");
    let cached = run_python(
        &first,
        "import importlib.util, six; print(importlib.util.cache_from_source(six.__file__))",
    );
    assert!(Path::new(&cached).is_file(), "no bytecode for {six}");
    assert_eq!(b.freeze(&first, &job2).await.unwrap(), ["six==1.16.0"]);

    // An editable install of the checkout cannot be shared.
    let job3 = tmp.path().join("j3");
    write_file(
        &job3.join("src/pyproject.toml"),
        "[project]\nname = \"local-pkg\"\nversion = \"0.1\"\n[build-system]\nrequires = [\"setuptools\"]\nbuild-backend = \"setuptools.build_meta\"\n",
    );
    write_file(&job3.join("src/local_pkg.py"), "X = 1\n");
    write_file(&job3.join("src/requirements.txt"), "-e ./src\n");
    let own = tokio::time::timeout(
        LIMIT,
        b.prepare(&job3, &[], Some(&job3.join("src/requirements.txt"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(own, job3.join(VENV_DIR).join("bin/python"));
}

/// A shim (a script that execs the real interpreter, as pyenv's) is seen through once.
#[tokio::test]
async fn the_real_interpreter_behind_a_shim_is_found() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let real = run_python(&python(), "import sys; print(sys.executable)");
    let shim = tmp.path().join("python3");
    std::fs::write(&shim, format!("#!/bin/sh\nexec {real} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let found = runyard_agent::pyenv::real_interpreter(&shim).await.unwrap();
    assert_eq!(found, PathBuf::from(&real));
    let broken = tmp.path().join("broken");
    std::fs::write(&broken, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = runyard_agent::pyenv::real_interpreter(&broken)
        .await
        .unwrap_err();
    assert!(e.contains("failed"), "{e}");
}
