//! Disk hygiene on real directories of a few KiB: the sweep's LRU order, in-use protection, the
//! uv cache steps (with a fake uv that logs its calls, and the real one when on PATH), free-space
//! helpers, and the uv bootstrap for real from PyPI.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use runyard_agent::cache::{
    self, CacheKind, Janitor, LAST_USED, disk_usage, free_bytes, touch_mirror,
};
use runyard_agent::pyenv::{UV_TOOL_DIR, bootstrap_uv};

/// A directory holding one file of `kib` KiB.
fn filled(dir: &Path, kib: usize) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("data"), vec![7u8; kib * 1024]).unwrap();
    dir.to_path_buf()
}

fn set_mtime(path: &Path, age: Duration) {
    fs::File::open(path)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A data dir as the agent leaves it: spool, reporter, tools, an uv cache.
struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    uv_cache: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let data = fs::canonicalize(tmp.path()).unwrap().join("data");
    filled(&data.join("jobs/spool/j1"), 4);
    filled(&data.join("reporter"), 4);
    filled(&data.join("tools"), 4);
    let uv_cache = filled(&data.join("uv-cache"), 8);
    Fixture {
        _tmp: tmp,
        data,
        uv_cache,
    }
}

fn paths(report: &cache::SweepReport) -> Vec<PathBuf> {
    report.reclaimed.iter().map(|r| r.path.clone()).collect()
}

#[test]
fn sweep_reclaims_leftover_jobs_then_least_recently_used_mirrors_and_spares_what_is_in_use() {
    let f = fixture();
    let jobs = f.data.join("jobs");
    let mirrors = f.data.join("mirrors");
    let old_job = filled(&jobs.join("a-1"), 8);
    let new_job = filled(&jobs.join("c-1"), 8);
    let running = filled(&jobs.join("b-1"), 64);
    // m_recent: touched now; m_hour: last used an hour ago; m_fallback: no marker, dir mtime
    // three hours ago; m_busy: the oldest, but in use.
    let m_recent = filled(&mirrors.join("recent.git"), 8);
    touch_mirror(&m_recent).unwrap();
    let m_hour = filled(&mirrors.join("hour.git"), 8);
    touch_mirror(&m_hour).unwrap();
    set_mtime(&m_hour.join(LAST_USED), hours(1));
    let m_fallback = filled(&mirrors.join("fallback.git"), 8);
    set_mtime(&m_fallback, hours(3));
    let m_busy = filled(&mirrors.join("busy.git"), 8);
    set_mtime(&m_busy, hours(9));
    set_mtime(&new_job, hours(1));
    set_mtime(&old_job, hours(2));

    let measured = [
        &f.uv_cache,
        &old_job,
        &new_job,
        &m_recent,
        &m_hour,
        &m_fallback,
        &m_busy,
    ]
    .iter()
    .map(|p| disk_usage(p))
    .sum::<u64>();
    // Over by the two leftover jobs, the oldest free mirror and half the next: those four go.
    let must_free = disk_usage(&old_job)
        + disk_usage(&new_job)
        + disk_usage(&m_fallback)
        + disk_usage(&m_hour) / 2;
    let max = measured - must_free;
    let in_use: HashSet<PathBuf> = [running.clone(), m_busy.clone()].into();
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), max);
    let report = j.sweep(&in_use, None).unwrap();

    assert_eq!(report.before_bytes, measured);
    assert_eq!(
        paths(&report),
        vec![
            old_job.clone(),
            new_job.clone(),
            m_fallback.clone(),
            m_hour.clone()
        ]
    );
    assert!(report.reclaimed.iter().map(|r| r.kind).eq([
        CacheKind::JobDir,
        CacheKind::JobDir,
        CacheKind::Mirror,
        CacheKind::Mirror
    ]));
    assert!(report.after_bytes <= max, "{report:?}");
    assert_eq!(
        report.after_bytes,
        report.before_bytes - report.reclaimed_bytes()
    );
    for gone in [&old_job, &new_job, &m_fallback, &m_hour] {
        assert!(!gone.exists(), "{}", gone.display());
    }
    for kept in [&running, &m_busy, &m_recent, &f.uv_cache] {
        assert!(kept.join("data").exists(), "{}", kept.display());
    }
    for never in ["jobs/spool/j1/data", "reporter/data", "tools/data"] {
        assert!(f.data.join(never).exists(), "{never}");
    }
    // No trash left behind by the mirrors' rename-then-delete.
    let names: Vec<String> = fs::read_dir(&mirrors)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn under_the_limit_nothing_is_touched_but_interrupted_deletions_are_finished() {
    let f = fixture();
    let leftover = filled(&f.data.join("jobs/a-1"), 4);
    let mirror = filled(&f.data.join("mirrors/x.git"), 4);
    let trash = filled(&f.data.join("mirrors/y.git.deleting"), 4);
    let trash_bytes = disk_usage(&trash);
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), 10 << 20);
    let report = j.sweep(&HashSet::new(), None).unwrap();
    assert_eq!(paths(&report), vec![trash.clone()]);
    assert_eq!(report.reclaimed[0].bytes, trash_bytes);
    assert!(!trash.exists());
    assert!(leftover.exists() && mirror.exists() && f.uv_cache.exists());
    assert_eq!(
        report.after_bytes,
        disk_usage(&leftover) + disk_usage(&mirror) + disk_usage(&f.uv_cache)
    );
    // A data dir that does not exist yet is an empty one.
    let j = Janitor::new(f.data.join("nope"), f.data.join("nope/uv"), 0);
    assert_eq!(j.sweep(&HashSet::new(), None).unwrap().before_bytes, 0);
}

#[test]
fn in_use_paths_are_matched_through_symlinks_and_protect_a_first_fetch() {
    let f = fixture();
    let link = f.data.parent().unwrap().join("link");
    std::os::unix::fs::symlink(&f.data, &link).unwrap();
    let job = filled(&f.data.join("jobs/a-1"), 4);
    let fetching = filled(&f.data.join("mirrors/x.git.tmp"), 4);
    // The agent names dirs through its configured (here: symlinked) data dir.
    let in_use: HashSet<PathBuf> = [link.join("jobs/a-1"), link.join("mirrors/x.git")].into();
    let j = Janitor::new(link.clone(), link.join("uv-cache"), 0);
    let report = j.sweep(&in_use, None).unwrap();
    assert!(job.exists() && fetching.exists());
    assert_eq!(paths(&report), vec![f.uv_cache.clone()]);
    assert!(!f.uv_cache.exists(), "no uv: the cache dir is removed");
    assert_eq!(report.after_bytes, disk_usage(&fetching));
}

/// A fake uv that appends its arguments to `log`; `prune` deletes `junk`, `clean` everything.
fn fake_uv(dir: &Path, log: &Path) -> PathBuf {
    let uv = dir.join("fake-uv");
    fs::write(
        &uv,
        format!(
            "#!/bin/sh\necho \"$* $UV_CACHE_DIR\" >> {log}\n\
             case \"$2\" in prune) rm -f \"$4/junk\";; clean) rm -rf \"$4\"/*;; esac\n",
            log = log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&uv, fs::Permissions::from_mode(0o755)).unwrap();
    uv
}

#[test]
fn uv_cache_is_pruned_first_and_cleaned_only_if_still_over() {
    let f = fixture();
    let tmp = f.data.parent().unwrap().to_path_buf();
    let log = tmp.join("uv.log");
    let uv = fake_uv(&tmp, &log);
    fs::write(f.uv_cache.join("junk"), vec![1u8; 16 << 10]).unwrap();
    let mirror = filled(&f.data.join("mirrors/x.git"), 4);
    let c = f.uv_cache.display().to_string();

    // Pruning the junk is enough: no clean.
    // Still over once the mirror is gone; under once the 16 KiB of junk are pruned.
    let max = disk_usage(&f.uv_cache) - (12 << 10);
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), max);
    let report = j.sweep(&HashSet::new(), Some(&uv)).unwrap();
    let hows: Vec<&str> = report.reclaimed.iter().map(|r| r.how).collect();
    assert_eq!(hows, ["removed", "uv cache prune"], "{report:?}");
    assert_eq!(report.reclaimed[0].path, mirror);
    assert!(report.reclaimed[1].bytes >= 16 << 10, "{report:?}");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        format!("cache prune --cache-dir {c} {c}\n")
    );
    assert!(f.uv_cache.join("data").exists());

    // Nothing may stay: prune, then clean.
    fs::remove_file(&log).unwrap();
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), 0);
    let report = j.sweep(&HashSet::new(), Some(&uv)).unwrap();
    let hows: Vec<&str> = report.reclaimed.iter().map(|r| r.how).collect();
    assert_eq!(hows, ["uv cache prune", "uv cache clean"], "{report:?}");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        format!("cache prune --cache-dir {c} {c}\ncache clean --cache-dir {c} {c}\n")
    );
    assert!(!f.uv_cache.join("data").exists());
    assert_eq!(report.after_bytes, disk_usage(&f.uv_cache));
}

#[test]
fn a_failing_uv_leaves_the_cache_alone_and_an_in_use_cache_is_never_touched() {
    let f = fixture();
    let before = disk_usage(&f.uv_cache);
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), 0);
    let report = j
        .sweep(&HashSet::new(), Some(Path::new("/bin/false")))
        .unwrap();
    assert!(report.reclaimed.is_empty(), "{report:?}");
    assert_eq!(report.after_bytes, before);
    let in_use: HashSet<PathBuf> = [f.uv_cache.clone()].into();
    let report = j.sweep(&in_use, None).unwrap();
    assert!(report.reclaimed.is_empty(), "{report:?}");
    assert!(f.uv_cache.join("data").exists());
}

#[test]
fn real_uv_cleans_a_cache_when_on_path() {
    let Some(uv) = on_path("uv") else {
        eprintln!("SKIPPED: uv is not on PATH");
        return;
    };
    let f = fixture();
    fs::create_dir_all(f.uv_cache.join("archive-v0/x")).unwrap();
    fs::write(f.uv_cache.join("archive-v0/x/f"), vec![1u8; 8 << 10]).unwrap();
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), 0);
    let report = j.sweep(&HashSet::new(), Some(&uv)).unwrap();
    assert!(report.reclaimed_bytes() >= 16 << 10, "{report:?}");
    assert!(!f.uv_cache.join("data").exists());
    assert!(!f.uv_cache.join("archive-v0/x/f").exists());
}

#[test]
fn default_limit_is_a_share_of_free_space_plus_the_caches() {
    let f = fixture();
    let j = Janitor::with_default_limit(f.data.clone(), f.uv_cache.clone()).unwrap();
    let free = free_bytes(&f.data).unwrap();
    let held = disk_usage(&f.uv_cache);
    let expected = (free + held) / 100 * cache::DEFAULT_CACHE_PERCENT;
    // Free space moves while other processes write: allow 2 % of it.
    let slack = expected / 50;
    assert!(
        j.max_bytes.abs_diff(expected) <= slack,
        "{} vs {expected}",
        j.max_bytes
    );
    assert!(f.uv_cache.join("data").exists());
}

#[test]
fn free_space_touch_and_disk_full() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(free_bytes(tmp.path()).unwrap() > 0);
    let e = free_bytes(&tmp.path().join("missing")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(!cache::is_disk_full(&e));

    let m = filled(&tmp.path().join("m.git"), 1);
    touch_mirror(&m).unwrap();
    set_mtime(&m.join(LAST_USED), hours(5));
    touch_mirror(&m).unwrap();
    let age = fs::metadata(m.join(LAST_USED))
        .unwrap()
        .modified()
        .unwrap()
        .elapsed()
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{age:?}");
    assert!(touch_mirror(&tmp.path().join("gone.git")).is_err());

    let full = fs::write("/dev/full", b"x").unwrap_err();
    assert!(cache::is_disk_full(&full), "{full}");
}

/// Installs uv from PyPI into a temp tools dir, replacing a broken one; a concurrent second
/// call waits and reuses it; a later call returns at once.
#[tokio::test]
async fn bootstrap_installs_uv_once_and_reuses_it() {
    let python = on_path("python3").expect("python3 on PATH");
    let tmp = tempfile::tempdir().unwrap();
    let tools = tmp.path().join("tools");
    // A broken install (say, an interrupted copy) must be replaced, not trusted.
    let broken = tools.join(UV_TOOL_DIR).join("bin");
    fs::create_dir_all(&broken).unwrap();
    fs::write(broken.join("uv"), "#!/bin/sh\nexit 1\n").unwrap();
    fs::set_permissions(broken.join("uv"), fs::Permissions::from_mode(0o755)).unwrap();
    // And a crashed attempt's temporary dir is cleaned up.
    filled(&tools.join(format!("{UV_TOOL_DIR}.tmp-1")), 1);

    let limit = Duration::from_secs(300);
    let (a, b) = tokio::time::timeout(
        limit,
        futures::future::join(bootstrap_uv(&python, &tools), bootstrap_uv(&python, &tools)),
    )
    .await
    .expect("bootstrap within 5 minutes");
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    assert_eq!(a, tools.join(UV_TOOL_DIR).join("bin/uv"));
    let out = std::process::Command::new(&a)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("uv "));
    let mut names: Vec<String> = fs::read_dir(&tools)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [UV_TOOL_DIR.to_string(), format!("{UV_TOOL_DIR}.lock")]
    );

    let started = Instant::now();
    let again = bootstrap_uv(&python, &tools).await.unwrap();
    assert_eq!(again, a);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bootstrap_failure_is_an_error_and_leaves_no_uv() {
    let tmp = tempfile::tempdir().unwrap();
    let tools = tmp.path().join("tools");
    let e = bootstrap_uv(Path::new("/nonexistent/python3"), &tools)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/python3"), "{e}");
    assert!(!tools.join(UV_TOOL_DIR).exists());
}

#[test]
fn shared_environments_go_least_recently_used_after_mirrors_sparing_recent_and_busy_ones() {
    let f = fixture();
    let envs = f.data.join(runyard_agent::ENVS_DIR);
    let ready = |dir: &Path, age: Duration| {
        fs::write(dir.join(runyard_agent::pyenv::READY), b"").unwrap();
        set_mtime(&dir.join(runyard_agent::pyenv::READY), age);
    };
    let old = filled(&envs.join("old"), 8);
    ready(&old, hours(5));
    let older_busy = filled(&envs.join("busy"), 8);
    ready(&older_busy, hours(9));
    let recent = filled(&envs.join("recent"), 8);
    ready(&recent, Duration::from_secs(60));
    let half_deleted = filled(&envs.join("gone.deleting"), 8);
    fs::write(envs.join("old.lock"), b"").unwrap();
    let in_use: HashSet<PathBuf> = [older_busy.clone()].into();
    // A limit nothing can meet: everything that may go, goes, in order.
    let j = Janitor::new(f.data.clone(), f.uv_cache.clone(), 0);
    let report = j.sweep(&in_use, None).unwrap();
    let envs_reclaimed: Vec<PathBuf> = report
        .reclaimed
        .iter()
        .filter(|r| r.kind == CacheKind::Env)
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(envs_reclaimed, [half_deleted.clone(), old.clone()]);
    assert!(!old.exists() && !half_deleted.exists());
    assert!(
        recent.exists(),
        "used in the last minutes: a job may be starting in it"
    );
    assert!(older_busy.exists(), "in use");
    assert!(envs.join("old.lock").exists());
}
