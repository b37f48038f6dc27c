//! Checkout cache against fixture repositories made with the `git` CLI at test time: local paths,
//! `file://` and `git://` (a `git daemon` on a free loopback port).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runyard_agent::checkout::{CheckoutCache, CheckoutError, resolve_script, resolve_script_at};
use tokio_util::sync::CancellationToken;

/// Runs git in `dir` isolated from the user's and system's configuration; returns trimmed stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn commit(dir: &Path, msg: &str) -> String {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", msg]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A repository with `main` (common.py, a.py, an executable run.sh, a symlink to a.py), an
/// annotated tag `v1` and a branch `feature` adding b.py. Returns (dir, main commit, feature).
fn fixture(root: &Path) -> (PathBuf, String, String) {
    let dir = root.join("src");
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q"]);
    write(&dir, "common.py", "COMMON = 1\n");
    write(&dir, "a.py", "print('v1')\n");
    write(&dir, "pkg/mod.py", "X = 1\n");
    write(&dir, "run.sh", "#!/bin/sh\necho hi\n");
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.py", dir.join("alias.py")).unwrap();
    let main = commit(&dir, "first");
    git(&dir, &["tag", "-a", "v1", "-m", "version 1"]);
    git(&dir, &["checkout", "-q", "-b", "feature"]);
    write(&dir, "b.py", "print('b')\n");
    let feature = commit(&dir, "feature");
    git(&dir, &["checkout", "-q", "main"]);
    (dir, main, feature)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn branches_tags_default_branch_and_new_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, main1, feature) = fixture(tmp.path());
    let cache = CheckoutCache::new(tmp.path().join("cache"));
    let url = src.to_str().unwrap();
    let none = CancellationToken::new();

    let d = tmp.path().join("job1");
    let c = cache.checkout(url, "", &d, &none).await.unwrap();
    assert_eq!(c, main1);
    assert_eq!(read(&d.join("a.py")), "print('v1')\n");
    assert_eq!(read(&d.join("pkg/mod.py")), "X = 1\n");
    assert!(!d.join(".git").exists(), "no .git in a job checkout");
    assert!(!d.join("b.py").exists());
    let mode = std::fs::metadata(d.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "executable bit kept: {mode:o}");
    assert_eq!(
        std::fs::read_link(d.join("alias.py")).unwrap(),
        Path::new("a.py")
    );
    let mirrors = entries(&tmp.path().join("cache"));
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    assert!(mirrors[0].ends_with("-src.git"), "{mirrors:?}");

    let d = tmp.path().join("job2");
    assert_eq!(
        cache.checkout(url, "feature", &d, &none).await.unwrap(),
        feature
    );
    assert_eq!(read(&d.join("b.py")), "print('b')\n");
    assert_eq!(read(&d.join("common.py")), "COMMON = 1\n");

    // A second commit after the mirror exists is fetched.
    write(&src, "a.py", "print('v2')\n");
    let main2 = commit(&src, "second");
    let d = tmp.path().join("job3");
    assert_eq!(cache.checkout(url, "main", &d, &none).await.unwrap(), main2);
    assert_eq!(read(&d.join("a.py")), "print('v2')\n");

    // The annotated tag still gives the first commit, with every file (including those the
    // mirror's HEAD shares with it).
    let d = tmp.path().join("job4");
    assert_eq!(cache.checkout(url, "v1", &d, &none).await.unwrap(), main1);
    assert_eq!(read(&d.join("a.py")), "print('v1')\n");
    assert_eq!(read(&d.join("common.py")), "COMMON = 1\n");
    assert_eq!(read(&d.join("pkg/mod.py")), "X = 1\n");

    // The remote's default branch moves: an empty revision follows it.
    git(&src, &["symbolic-ref", "HEAD", "refs/heads/feature"]);
    let d = tmp.path().join("job5");
    assert_eq!(cache.checkout(url, "", &d, &none).await.unwrap(), feature);

    // A deleted branch is pruned from the mirror.
    git(&src, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    git(&src, &["branch", "-q", "-D", "feature"]);
    let e = cache
        .checkout(url, "feature", &tmp.path().join("job6"), &none)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckoutError::Revision(_)), "{e}");
    assert_eq!(entries(&tmp.path().join("cache")).len(), 1);
}

#[tokio::test]
async fn commit_ids_full_and_abbreviated() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, main, feature) = fixture(tmp.path());
    let cache = CheckoutCache::new(tmp.path().join("cache"));
    let url = format!("file://{}", src.display());
    let none = CancellationToken::new();

    let c = cache
        .checkout(&url, &feature[..7], &tmp.path().join("j1"), &none)
        .await
        .unwrap();
    assert_eq!(c, feature);
    assert!(tmp.path().join("j1/b.py").exists());
    let c = cache
        .checkout(&url, &main.to_uppercase(), &tmp.path().join("j2"), &none)
        .await
        .unwrap();
    assert_eq!(c, main);

    // A full id already in the mirror needs no network: the remote may even be gone.
    std::fs::rename(&src, tmp.path().join("moved")).unwrap();
    let c = cache
        .checkout(&url, &main, &tmp.path().join("j3"), &none)
        .await
        .unwrap();
    assert_eq!(c, main);
    assert_eq!(read(&tmp.path().join("j3/a.py")), "print('v1')\n");
    // A branch must be fetched, and that now fails with git's message.
    let e = cache
        .checkout(&url, "main", &tmp.path().join("j4"), &none)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckoutError::Clone(_)), "{e}");
}

#[tokio::test]
async fn missing_revisions_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _, _) = fixture(tmp.path());
    let cache = CheckoutCache::new(tmp.path().join("cache"));
    let url = src.to_str().unwrap();
    let none = CancellationToken::new();
    for rev in [
        "no-such-branch",
        "deadbeef",
        "0123456789012345678901234567890123456789",
    ] {
        let dest = tmp.path().join("job");
        let e = cache.checkout(url, rev, &dest, &none).await.unwrap_err();
        match &e {
            CheckoutError::Revision(m) => assert!(m.contains(&format!("`{rev}`")), "{m}"),
            other => panic!("{rev}: expected a revision error, got {other:?}"),
        }
        assert!(!dest.exists(), "nothing written for a bad revision");
    }
}

#[tokio::test]
async fn bad_urls_fail_with_gits_message_and_leave_no_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let not_repo = tmp.path().join("plain");
    std::fs::create_dir_all(&not_repo).unwrap();
    let cache_root = tmp.path().join("cache");
    let cache = CheckoutCache::new(cache_root.clone());
    let none = CancellationToken::new();
    let missing = tmp.path().join("missing").display().to_string();
    for url in [missing.as_str(), not_repo.to_str().unwrap()] {
        let e = cache
            .checkout(url, "", &tmp.path().join("job"), &none)
            .await
            .unwrap_err();
        match &e {
            CheckoutError::Clone(m) if url == missing => {
                assert_eq!(m, &format!("cannot fetch {url}: no such directory"));
            }
            CheckoutError::Clone(m) => {
                assert!(m.contains(url), "{m}");
                // git's own message follows ours.
                assert!(m.len() > format!("cannot fetch {url}: ").len() + 5, "{m}");
            }
            other => panic!("{url}: expected a clone error, got {other:?}"),
        }
    }
    assert_eq!(entries(&cache_root), Vec::<String>::new());
}

#[tokio::test]
async fn cancelled_before_start_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _, _) = fixture(tmp.path());
    let cache = CheckoutCache::new(tmp.path().join("cache"));
    let cancel = CancellationToken::new();
    cancel.cancel();
    let e = cache
        .checkout(src.to_str().unwrap(), "", &tmp.path().join("job"), &cancel)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckoutError::Cancelled), "{e}");
    assert!(!tmp.path().join("cache").exists());
}

#[tokio::test]
async fn non_empty_destination_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _, _) = fixture(tmp.path());
    let cache = CheckoutCache::new(tmp.path().join("cache"));
    let dest = tmp.path().join("job");
    write(&dest, "left-over", "x");
    let e = cache
        .checkout(src.to_str().unwrap(), "", &dest, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, CheckoutError::Materialize { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checkouts_of_one_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, main1, _) = fixture(tmp.path());
    let cache = Arc::new(CheckoutCache::new(tmp.path().join("cache")));
    let url = src.display().to_string();

    for round in 0..2 {
        let expected = if round == 0 {
            main1.clone()
        } else {
            write(&src, "a.py", "print('v2')\n");
            commit(&src, "second")
        };
        let mut set = tokio::task::JoinSet::new();
        for i in 0..8 {
            let (cache, url) = (cache.clone(), url.clone());
            let dest = tmp.path().join(format!("r{round}-job{i}"));
            let rev = if i % 2 == 0 { "" } else { "main" };
            set.spawn(async move {
                let c = cache
                    .checkout(&url, rev, &dest, &CancellationToken::new())
                    .await;
                (c, dest)
            });
        }
        while let Some(r) = set.join_next().await {
            let (c, dest) = r.unwrap();
            assert_eq!(c.unwrap(), expected);
            let want = if round == 0 {
                "print('v1')\n"
            } else {
                "print('v2')\n"
            };
            assert_eq!(read(&dest.join("a.py")), want);
        }
    }
    assert_eq!(entries(&tmp.path().join("cache")).len(), 1);
    // The mirror is sound afterwards.
    let mirror = cache.mirror_path(&url);
    git(&mirror, &["fsck", "--no-progress"]);
}

#[test]
fn scripts_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let wt = tmp.path().join("wt");
    write(&wt, "train.py", "print(1)\n");
    write(&wt, "sub/inner.py", "print(2)\n");
    std::fs::create_dir_all(wt.join("adir")).unwrap();
    write(tmp.path(), "outside.py", "print('outside')\n");
    std::os::unix::fs::symlink("train.py", wt.join("alias.py")).unwrap();
    std::os::unix::fs::symlink("../outside.py", wt.join("escape.py")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", wt.join("abs.py")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/x.py", wt.join("gone-outside.py")).unwrap();
    std::os::unix::fs::symlink("nothing.py", wt.join("dangling.py")).unwrap();
    std::os::unix::fs::symlink(tmp.path(), wt.join("outdir")).unwrap();

    let real = wt.canonicalize().unwrap();
    assert_eq!(
        resolve_script(&wt, "train.py").unwrap(),
        real.join("train.py")
    );
    assert_eq!(
        resolve_script(&wt, "sub/inner.py").unwrap(),
        real.join("sub/inner.py")
    );
    assert_eq!(
        resolve_script(&wt, "alias.py").unwrap(),
        real.join("train.py")
    );

    let err = |s: &str| resolve_script(&wt, s).unwrap_err();
    assert_eq!(
        resolve_script_at(&wt, "x.py", "0123456789abcdef0123456789abcdef01234567").unwrap_err(),
        "script `x.py` not found in the repository at 0123456789ab"
    );
    assert_eq!(err("x.py"), "script `x.py` not found in the repository");
    for s in [
        "escape.py",
        "abs.py",
        "gone-outside.py",
        "outdir/outside.py",
    ] {
        assert_eq!(
            err(s),
            format!("script `{s}` is a symlink pointing outside the repository")
        );
    }
    assert!(
        err("dangling.py").contains("broken symlink"),
        "{}",
        err("dangling.py")
    );
    assert!(err("adir").contains("is not a file"), "{}", err("adir"));
    for s in ["../outside.py", "/etc/passwd", ""] {
        assert!(
            err(s).contains("not a relative path inside the repository"),
            "{s}: {}",
            err(s)
        );
    }
}

/// A `git daemon` child, killed and reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn clone_over_git_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, main, feature) = fixture(tmp.path());
    let base = tmp.path().join("served");
    std::fs::create_dir_all(&base).unwrap();
    git(
        &base,
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            "fixture.git",
        ],
    );

    let port = {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let daemon = Daemon(
        Command::new("git")
            .args([
                "daemon",
                &format!("--base-path={}", base.display()),
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
            ])
            .arg(&base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(Instant::now() < deadline, "git daemon did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let cache = CheckoutCache::new(tmp.path().join("cache"));
    let url = format!("git://127.0.0.1:{port}/fixture.git");
    let none = CancellationToken::new();
    let d = tmp.path().join("j1");
    assert_eq!(cache.checkout(&url, "", &d, &none).await.unwrap(), main);
    assert_eq!(read(&d.join("a.py")), "print('v1')\n");
    let d = tmp.path().join("j2");
    assert_eq!(
        cache.checkout(&url, "feature", &d, &none).await.unwrap(),
        feature
    );
    assert!(d.join("b.py").exists());
    let e = cache
        .checkout(&url, "nope", &tmp.path().join("j3"), &none)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckoutError::Revision(_)), "{e}");
    let e = cache
        .checkout(
            &format!("git://127.0.0.1:{port}/absent.git"),
            "",
            &tmp.path().join("j4"),
            &none,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CheckoutError::Clone(_)), "{e}");
    drop(daemon);
}
