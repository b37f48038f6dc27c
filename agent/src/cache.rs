//! Disk hygiene of the agent's data dir: a size limit on its caches, reclaimed least recently
//! used first, and the free-space checks that keep a full disk a job failure, not an agent one.
//!
//! Invariants:
//! - Only caches are ever deleted: bare mirrors (`mirrors/*`), the uv cache, shared job
//!   environments (`envs/*`, not used for [`ENV_GRACE`]) and leftover attempt dirs (`jobs/*`). `jobs/spool`, `reporter/` and `tools/` are never touched, nor is
//!   anything in, above or below a path of the sweep's `in_use` set (held through [`InUse`]).
//! - Reclaim order when the measured total is over the limit, stopping as soon as it is not:
//!   leftover attempt dirs (oldest first), mirrors by last use (the mtime of their
//!   [`LAST_USED`] file, else of the mirror dir), shared environments by last use, then the uv
//!   cache (`uv cache prune`, then
//!   `uv cache clean`; removed outright when there is no uv).
//! - A mirror is first renamed to `<name>.deleting`, then removed, so a half-deleted mirror is
//!   never mistaken for a usable one; such leftovers are removed by every sweep, over the limit
//!   or not.
//! - Sizes are allocated bytes (`st_blocks`), each hardlinked inode counted once per sweep, the
//!   uv cache first: a venv hardlinked from the cache costs nothing extra, as on disk.
//! - Sweeps are blocking and serialized per [`Janitor`]; run them in `spawn_blocking`. The agent
//!   runs them in the background (every 5 minutes, and coalesced after job starts); a job start
//!   sweeps itself only when free space is short. [`SWEEPS`] counts them.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

/// File in a mirror whose mtime is the mirror's last use (see [`touch_mirror`]).
pub const LAST_USED: &str = ".last-used";
/// Share of the data dir's available space the caches may take by default, in percent.
pub const DEFAULT_CACHE_PERCENT: u64 = 80;
/// Below this many free bytes on the data dir's file system the agent refuses new jobs.
pub const DEFAULT_MIN_FREE: u64 = 1 << 30;
/// Suffix of a mirror being deleted.
const TRASH_SUFFIX: &str = ".deleting";
/// Suffix of a mirror whose first fetch is in progress (or was interrupted): see `checkout`.
const TMP_SUFFIX: &str = ".tmp";
/// The spool directory inside `jobs/`: live data, never a leftover.
pub const SPOOL_DIR: &str = "spool";
/// A shared environment used this recently is never reclaimed.
const ENV_GRACE: Duration = Duration::from_secs(600);
/// Longest a `uv cache` command may run: it waits for running installs to release the cache.
const UV_TIMEOUT: Duration = Duration::from_secs(120);

/// What kind of cache an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    /// An attempt dir in `jobs/` that no running attempt holds.
    JobDir,
    /// A bare mirror in `mirrors/` (or a leftover of one).
    Mirror,
    /// uv's shared cache, as a whole.
    UvCache,
    /// A shared job environment in `envs/`.
    Env,
}

/// One reclaim step of a sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reclaimed {
    pub kind: CacheKind,
    pub path: PathBuf,
    /// Bytes the step freed (measured before and after).
    pub bytes: u64,
    /// How: `"removed"`, `"uv cache prune"` or `"uv cache clean"`.
    pub how: &'static str,
}

/// What a sweep measured and reclaimed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// The limit the sweep applied.
    pub max_bytes: u64,
    /// Total size of the caches before reclaiming (in-use attempt dirs not included).
    pub before_bytes: u64,
    /// Total size after reclaiming; above `max_bytes` only when the rest is in use.
    pub after_bytes: u64,
    /// Reclaim steps in the order they ran.
    pub reclaimed: Vec<Reclaimed>,
}

impl SweepReport {
    /// Bytes freed by all steps.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.reclaimed.iter().map(|r| r.bytes).sum()
    }
}

/// Keeps the caches of one data dir under a size limit.
#[derive(Debug)]
pub struct Janitor {
    /// The agent's data dir (holding `mirrors/` and `jobs/`).
    pub data_dir: PathBuf,
    /// uv's shared cache (by default `<data_dir>/uv-cache`).
    pub uv_cache: PathBuf,
    /// Limit on the caches' total size.
    pub max_bytes: u64,
    /// Serializes sweeps: a timer and a job start may ask at once.
    sweeping: Mutex<()>,
}

/// Sweeps run by every janitor of this process: a walk of the caches is the cost a job start
/// must not pay (tests read it to show that jobs do not sweep).
pub static SWEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A measured cache entry.
struct Entry {
    kind: CacheKind,
    path: PathBuf,
    bytes: u64,
    last_used: SystemTime,
}

impl Janitor {
    /// A janitor keeping the caches of `data_dir` and `uv_cache` under `max_bytes`.
    pub fn new(data_dir: PathBuf, uv_cache: PathBuf, max_bytes: u64) -> Self {
        Janitor {
            data_dir,
            uv_cache,
            max_bytes,
            sweeping: Mutex::new(()),
        }
    }

    /// A janitor with the default limit: [`DEFAULT_CACHE_PERCENT`] of the space the caches can
    /// use, that is the data dir's free space plus what the caches already hold (so a restart
    /// with full caches does not shrink the limit and wipe them). Blocking; `data_dir` must exist.
    pub fn with_default_limit(data_dir: PathBuf, uv_cache: PathBuf) -> io::Result<Self> {
        let mut janitor = Janitor::new(data_dir, uv_cache, u64::MAX);
        let free = free_bytes(&janitor.data_dir)?;
        let held = janitor.sweep(&HashSet::new(), None)?.before_bytes;
        let available = u128::from(free) + u128::from(held);
        janitor.max_bytes =
            u64::try_from(available * u128::from(DEFAULT_CACHE_PERCENT) / 100).unwrap_or(u64::MAX);
        Ok(janitor)
    }

    /// Measures the caches and, when their total is over the limit, reclaims least recently
    /// used entries until it is not (see the module invariants for the order). Nothing in,
    /// above or below a path of `in_use` is deleted. `uv`: the uv binary, if any, to prune and
    /// clean its cache with; without one the cache dir is removed.
    ///
    /// Errors only when the data dir cannot be listed; entries that cannot be measured or
    /// removed are logged and skipped.
    pub fn sweep(&self, in_use: &HashSet<PathBuf>, uv: Option<&Path>) -> io::Result<SweepReport> {
        let _serial = self.sweeping.lock().unwrap_or_else(|e| e.into_inner());
        SWEEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let mut report = SweepReport {
            max_bytes: self.max_bytes,
            ..SweepReport::default()
        };
        let data_dir = match fs::canonicalize(&self.data_dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
            Err(e) => return Err(e),
        };
        let in_use: Vec<PathBuf> = in_use.iter().map(|p| normalize(p)).collect();
        let uv_cache = normalize(&self.uv_cache);
        let mirrors = data_dir.join("mirrors");
        let jobs = data_dir.join("jobs");
        let envs = data_dir.join(crate::ENVS_DIR);

        // Leftovers of interrupted deletions: garbage whatever the limit.
        for (dir, kind) in [(&mirrors, CacheKind::Mirror), (&envs, CacheKind::Env)] {
            for (path, _) in list(dir)? {
                if path.to_string_lossy().ends_with(TRASH_SUFFIX) {
                    let bytes = disk_usage(&path);
                    if remove(&path, kind) {
                        report.push(kind, path, bytes, "removed");
                    }
                }
            }
        }

        // uv's cache first, so the inodes it shares with venvs are counted as its own.
        let mut seen = HashSet::new();
        let mut uv_bytes = if uv_cache.exists() {
            usage(&uv_cache, &mut seen)
        } else {
            0
        };
        let mut total = uv_bytes;
        let mut mirror_entries = Vec::new();
        for (path, meta) in list(&mirrors)? {
            if !meta.is_dir() {
                continue;
            }
            let bytes = usage(&path, &mut seen);
            total += bytes;
            if covered(&in_use, &path) {
                continue;
            }
            let last_used = fs::metadata(path.join(LAST_USED))
                .and_then(|m| m.modified())
                .or_else(|_| meta.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            mirror_entries.push(Entry {
                kind: CacheKind::Mirror,
                path,
                bytes,
                last_used,
            });
        }
        let mut job_entries = Vec::new();
        for (path, meta) in list(&jobs)? {
            if path.file_name().is_some_and(|n| n == SPOOL_DIR) || covered(&in_use, &path) {
                continue;
            }
            let bytes = usage(&path, &mut seen);
            total += bytes;
            job_entries.push(Entry {
                kind: CacheKind::JobDir,
                path,
                bytes,
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        // Shared environments, by last use (their ready file's mtime); one used in the last
        // minutes is spared, as a job may be about to start in it.
        let mut env_entries = Vec::new();
        let recent = SystemTime::now() - ENV_GRACE;
        for (path, meta) in list(&envs)? {
            if !meta.is_dir() || path.to_string_lossy().ends_with(TRASH_SUFFIX) {
                continue;
            }
            let bytes = usage(&path, &mut seen);
            total += bytes;
            let last_used = fs::metadata(path.join(crate::pyenv::READY))
                .and_then(|m| m.modified())
                .or_else(|_| meta.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if covered(&in_use, &path) || last_used > recent {
                continue;
            }
            env_entries.push(Entry {
                kind: CacheKind::Env,
                path,
                bytes,
                last_used,
            });
        }
        report.before_bytes = total + report.reclaimed_bytes();

        if total > self.max_bytes {
            job_entries.sort_by_key(|e| e.last_used);
            mirror_entries.sort_by_key(|e| e.last_used);
            env_entries.sort_by_key(|e| e.last_used);
            for e in job_entries
                .into_iter()
                .chain(mirror_entries)
                .chain(env_entries)
            {
                if total <= self.max_bytes {
                    break;
                }
                if remove(&e.path, e.kind) {
                    total -= e.bytes;
                    report.push(e.kind, e.path, e.bytes, "removed");
                }
            }
        }
        if total > self.max_bytes && uv_bytes > 0 && !covered(&in_use, &uv_cache) {
            match uv {
                Some(uv) => {
                    for step in ["prune", "clean"] {
                        if total <= self.max_bytes {
                            break;
                        }
                        if let Err(error) = run_uv_cache(uv, step, &uv_cache) {
                            warn!(step, %error, cache = %uv_cache.display(), "uv cache step failed");
                            break;
                        }
                        let after = disk_usage(&uv_cache);
                        let freed = uv_bytes.saturating_sub(after);
                        total -= freed;
                        uv_bytes -= freed;
                        let how = if step == "prune" {
                            "uv cache prune"
                        } else {
                            "uv cache clean"
                        };
                        report.push(CacheKind::UvCache, uv_cache.clone(), freed, how);
                    }
                }
                None => {
                    if remove(&uv_cache, CacheKind::UvCache) {
                        total -= uv_bytes;
                        report.push(CacheKind::UvCache, uv_cache.clone(), uv_bytes, "removed");
                    }
                }
            }
        }
        report.after_bytes = total;

        let elapsed_ms = started.elapsed().as_millis() as u64;
        if total > self.max_bytes {
            warn!(
                after_bytes = total,
                max_bytes = self.max_bytes,
                "caches over their limit after the sweep: the rest is in use"
            );
        }
        if report.reclaimed.is_empty() {
            debug!(
                total_bytes = total,
                max_bytes = self.max_bytes,
                elapsed_ms,
                "cache sweep done"
            );
        } else {
            info!(
                before_bytes = report.before_bytes,
                after_bytes = total,
                reclaimed_bytes = report.reclaimed_bytes(),
                max_bytes = self.max_bytes,
                elapsed_ms,
                "cache sweep done"
            );
        }
        Ok(report)
    }
}

impl SweepReport {
    fn push(&mut self, kind: CacheKind, path: PathBuf, bytes: u64, how: &'static str) {
        info!(?kind, path = %path.display(), bytes, how, "cache entry reclaimed");
        self.reclaimed.push(Reclaimed {
            kind,
            path,
            bytes,
            how,
        });
    }
}

/// The paths sweeps must spare, each held by a guard for as long as it is used (an attempt's dir
/// for the attempt's life, a mirror during its checkout). Cheap to clone; clones share the set.
#[derive(Clone, Debug, Default)]
pub struct InUse(Arc<Mutex<HashMap<PathBuf, usize>>>);

/// Keeps a path in its [`InUse`] set until dropped.
#[derive(Debug)]
#[must_use = "the path is in use only while the guard lives"]
pub struct Held {
    set: InUse,
    path: PathBuf,
}

impl InUse {
    /// Marks `path` in use until the returned guard is dropped; holds nest.
    pub fn hold(&self, path: impl Into<PathBuf>) -> Held {
        let path = path.into();
        *self.lock().entry(path.clone()).or_default() += 1;
        Held {
            set: self.clone(),
            path,
        }
    }

    /// The paths held now, for [`Janitor::sweep`].
    pub fn snapshot(&self) -> HashSet<PathBuf> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut set = self.set.lock();
        if let Some(n) = set.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                set.remove(&self.path);
            }
        }
    }
}

/// Why a job must not start for lack of space: `Some("only 512.0 MiB free in /data, at least
/// 1.0 GiB needed")` when the file system holding `path` has less than `min_free` bytes free.
/// A file system that cannot be queried is logged and not held against the job. Blocking (one
/// `statvfs`).
pub fn low_space(path: &Path, min_free: u64) -> Option<String> {
    match free_bytes(path) {
        Ok(free) if free < min_free => Some(format!(
            "only {} free in {}, at least {} needed",
            format_size(free),
            path.display(),
            format_size(min_free)
        )),
        Ok(_) => None,
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read the free space");
            None
        }
    }
}

/// Marks a mirror as just used (creates or touches its [`LAST_USED`] file), so sweeps delete it
/// after mirrors used less recently. Blocking, cheap.
pub fn touch_mirror(mirror: &Path) -> io::Result<()> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(mirror.join(LAST_USED))?;
    f.set_modified(SystemTime::now())
}

/// Allocated size of a file or tree in bytes, not following symlinks, each hardlinked inode
/// counted once. Parts that cannot be read count as zero.
pub fn disk_usage(path: &Path) -> u64 {
    usage(path, &mut HashSet::new())
}

fn usage(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if !meta.is_dir() && meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Free bytes for unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Whether `e` (or an I/O error it wraps) says the disk or the user's quota is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io_err) = err.downcast_ref::<io::Error>() {
            if matches!(io_err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                || matches!(
                    io_err.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
            {
                return true;
            }
            if let Some(inner) = io_err.get_ref() {
                cur = Some(inner);
                continue;
            }
        }
        cur = err.source();
    }
    false
}

/// Whether a message from another program (git, uv, pip) reports a full disk or quota: the C
/// library's texts for `ENOSPC` and `EDQUOT`.
pub fn mentions_disk_full(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("Disk quota exceeded")
}

/// Parses a size (`500MiB`, `50GiB`, `1.5TB`, `1024`): the model's one size parser.
pub use runyard_model::size::parse as parse_size;

/// A size for people: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Entries of `dir` with their metadata (not following symlinks); none when it does not exist.
fn list(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            fs::symlink_metadata(&path).ok().map(|m| (path, m))
        })
        .collect())
}

/// `p` made absolute and free of symlinks, as far as it exists.
fn normalize(p: &Path) -> PathBuf {
    if let Ok(c) = fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
            normalize(parent).join(name)
        }
        _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Whether deleting `path` would touch something in use: it is, contains or lies inside an
/// in-use path. A mirror's `.tmp` first-fetch dir counts as the mirror.
fn covered(in_use: &[PathBuf], path: &Path) -> bool {
    let as_mirror = path
        .to_str()
        .and_then(|s| s.strip_suffix(TMP_SUFFIX))
        .map(PathBuf::from);
    [Some(path.to_path_buf()), as_mirror]
        .into_iter()
        .flatten()
        .any(|p| in_use.iter().any(|u| u.starts_with(&p) || p.starts_with(u)))
}

/// Removes a cache entry (a mirror through a rename, see the module invariants); logs and
/// returns false on failure. Gone already counts as removed.
fn remove(path: &Path, kind: CacheKind) -> bool {
    // Renamed first, so a half-deleted mirror or environment is never mistaken for a whole one.
    let renamed = matches!(kind, CacheKind::Mirror | CacheKind::Env);
    let result = if renamed && !path.to_string_lossy().ends_with(TRASH_SUFFIX) {
        let mut trash = path.as_os_str().to_owned();
        trash.push(TRASH_SUFFIX);
        let trash = PathBuf::from(trash);
        fs::rename(path, &trash).and_then(|()| remove_any(&trash))
    } else {
        remove_any(path)
    };
    match result {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(error) => {
            warn!(?kind, path = %path.display(), %error, "cannot remove a cache entry");
            false
        }
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Runs `uv cache <step>` on `cache`, bounded by [`UV_TIMEOUT`].
fn run_uv_cache(uv: &Path, step: &str, cache: &Path) -> io::Result<()> {
    let mut child = Command::new(uv)
        .args(["cache", step, "--cache-dir"])
        .arg(cache)
        .env("UV_CACHE_DIR", cache)
        .env("UV_NO_PROGRESS", "1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr {
            let _ = s.take(64 << 10).read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + UV_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = reader.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => {
            debug!(step, output = %output.trim(), "uv cache step done");
            Ok(())
        }
        Some(s) => Err(io::Error::other(format!("{s}: {}", output.trim()))),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timed out after {} s", UV_TIMEOUT.as_secs()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        for (s, want) in [
            ("1024", 1024),
            ("0", 0),
            ("500MiB", 500 << 20),
            ("50GiB", 50 << 30),
            ("50 gib", 50 << 30),
            ("50G", 50 << 30),
            ("1TB", 1_000_000_000_000),
            ("1TiB", 1 << 40),
            ("2KB", 2000),
            ("7B", 7),
            (" 1.5GiB ", 3 << 29),
            ("0.5KiB", 512),
            (".5k", 512),
            ("10.000MB", 10_000_000),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_the_input() {
        for s in [
            "",
            "GiB",
            "50XB",
            "-1",
            "1.2.3",
            "1e9",
            "18446744073709551616",
            "20000000TiB",
            "1 G iB",
        ] {
            let e = parse_size(s).unwrap_err();
            assert!(e.contains(&format!("`{s}`")), "{s}: {e}");
        }
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(50 << 30), "50.0 GiB");
        assert_eq!(format_size(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn disk_full_errors_are_recognized() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(is_disk_full(&io::Error::from(io::ErrorKind::StorageFull)));
        let wrapped = io::Error::other(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_disk_full(&wrapped));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EACCES)));
        assert!(!is_disk_full(&io::Error::other("no space")));
        // The real thing: /dev/full answers every write with ENOSPC.
        let real = fs::write("/dev/full", b"x").unwrap_err();
        assert!(is_disk_full(&real), "{real}");
        assert!(mentions_disk_full(&format!("pip failed: {real}")), "{real}");
        assert!(!mentions_disk_full("Permission denied"));
    }

    #[test]
    fn in_use_covers_the_path_its_parents_and_children_and_tmp_mirrors() {
        let in_use = vec![
            PathBuf::from("/d/jobs/a-1"),
            PathBuf::from("/d/mirrors/x.git"),
        ];
        assert!(covered(&in_use, Path::new("/d/jobs/a-1")));
        assert!(covered(&in_use, Path::new("/d/jobs")));
        assert!(covered(&in_use, Path::new("/d/jobs/a-1/src")));
        assert!(covered(&in_use, Path::new("/d/mirrors/x.git.tmp")));
        assert!(!covered(&in_use, Path::new("/d/jobs/a-10")));
        assert!(!covered(&in_use, Path::new("/d/mirrors/y.git")));
    }

    #[test]
    fn in_use_holds_nest_and_end_with_their_guards() {
        let set = InUse::default();
        let a = set.hold("/d/mirrors/x.git");
        let b = set.clone().hold("/d/mirrors/x.git");
        let c = set.hold("/d/jobs/j-1");
        assert_eq!(set.snapshot().len(), 2);
        drop(a);
        assert!(set.snapshot().contains(Path::new("/d/mirrors/x.git")));
        drop(b);
        assert_eq!(
            set.snapshot(),
            HashSet::from([PathBuf::from("/d/jobs/j-1")])
        );
        drop(c);
        assert!(set.snapshot().is_empty());
    }

    #[test]
    fn low_space_names_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(low_space(dir.path(), 0), None);
        let e = low_space(dir.path(), u64::MAX).unwrap();
        assert!(
            e.contains("free in") && e.contains("16384.0 PiB needed"),
            "{e}"
        );
        assert_eq!(low_space(&dir.path().join("missing"), u64::MAX), None);
    }

    #[test]
    fn normalize_resolves_what_exists_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let real = fs::canonicalize(dir.path()).unwrap();
        let link = real.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(normalize(&link.join("missing/x")), real.join("missing/x"));
        assert_eq!(normalize(&link), real);
    }
}
