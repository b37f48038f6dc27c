//! The log store: each attempt's lines in a plain file under `<data_dir>/logs/<job>/<attempt>.log`,
//! one line per `\n`, numbered by position (line N of the file has sequence number N).
//!
//! Invariants: a line is acknowledged to the agent only after it is written and fsynced, so a
//! controller crash loses no acknowledged line; appends are idempotent by sequence number (a
//! resent chunk overlapping persisted lines only adds the new tail), so reconnects never
//! duplicate a line; a gap (lines missing before the chunk) is refused, and the agent resends from
//! the acknowledged position. Job ids name directories, so every entry point refuses an id that
//! is not a job id (`runyard_model::is_job_id`), whoever the caller.
//!
//! Size limit (`LogStore::with_limit`): once an attempt's file reaches the limit, further lines
//! are still acknowledged (the agent frees its spool) but dropped. The file then no longer holds
//! every sequence number, so the acknowledged count is kept beside it in `<attempt>.acked`
//! (written with the dropping append, before the acknowledgement) and `lines()` reads it from
//! there, also after a restart. The one marker line saying how many lines were dropped is
//! written by `seal`, when the attempt's terminal status arrives: only then is the count final,
//! and the terminal state is not visible before it, so a reader that saw the job finished reads
//! the marker too.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// No limit on an attempt's file.
pub const UNLIMITED: u64 = u64::MAX;

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Bytes an attempt's file may reach before lines are dropped.
    limit: u64,
    /// Per (job, attempt), loaded lazily from the files; a bounded cache (see `remember`).
    state: Mutex<States>,
    /// Bumped on every append to a job, for followers.
    notify: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Serializes appends per process; appends are short. Holds the ids of removed jobs (most
    /// recent `REMOVED_KEPT`), so a chunk that raced a delete is acknowledged, not written.
    write: tokio::sync::Mutex<Removed>,
}

/// Jobs whose lines were removed, remembered so that no late append recreates their files.
const REMOVED_KEPT: usize = 16_384;

#[derive(Default)]
struct Removed {
    ids: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Removed {
    fn insert(&mut self, job: &str) {
        if self.ids.insert(job.to_string()) {
            self.order.push_back(job.to_string());
        }
        while self.order.len() > REMOVED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

/// Attempts whose state stays cached; beyond it, the least recently changed half is dropped
/// (the files are the truth: a dropped state is loaded again when needed).
const STATES_CACHED: usize = 8192;

/// Cached attempt states with the tick of their last change.
#[derive(Default)]
struct States {
    map: HashMap<(String, u32), (AttemptLog, u64)>,
    tick: u64,
}

impl States {
    fn get(&self, key: &(String, u32)) -> Option<AttemptLog> {
        self.map.get(key).map(|(s, _)| *s)
    }

    /// Records a state; `fresh`: only if none is cached (a load racing a change loses).
    fn remember(&mut self, key: (String, u32), s: AttemptLog, fresh: bool) -> AttemptLog {
        self.tick += 1;
        let tick = self.tick;
        let kept = if fresh {
            self.map.entry(key).or_insert((s, tick)).0
        } else {
            self.map.insert(key, (s, tick));
            s
        };
        if self.map.len() > STATES_CACHED {
            let mut ticks: Vec<u64> = self.map.values().map(|(_, t)| *t).collect();
            let (_, median, _) = ticks.select_nth_unstable(STATES_CACHED / 2);
            let cut = *median;
            self.map.retain(|_, (_, t)| *t > cut);
        }
        kept
    }
}

/// What is known of one attempt's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AttemptLog {
    /// Acknowledged lines (sequence numbers), kept or dropped.
    acked: u64,
    /// Bytes in the file.
    bytes: u64,
    /// Lines written to the file (less than `acked` once lines were dropped).
    kept: u64,
    /// The marker line is written.
    sealed: bool,
}

impl AttemptLog {
    fn dropped(&self) -> u64 {
        self.acked - self.kept
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Persisted; the attempt now has this many lines.
    Through(u64),
    /// The chunk starts after the persisted end: resend from this sequence number.
    Gap(u64),
}

impl LogStore {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<LogStore> {
        LogStore::with_limit(root, UNLIMITED)
    }

    /// A store whose attempt files stop growing at about `limit` bytes (whole lines).
    pub fn with_limit(root: impl Into<PathBuf>, limit: u64) -> io::Result<LogStore> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                root,
                limit,
                state: Mutex::new(States::default()),
                notify: Mutex::new(HashMap::new()),
                write: tokio::sync::Mutex::new(Removed::default()),
            }),
        })
    }

    pub fn path(&self, job: &str, attempt: u32) -> PathBuf {
        self.inner.root.join(job).join(format!("{attempt}.log"))
    }

    fn acked_path(&self, job: &str, attempt: u32) -> PathBuf {
        self.inner.root.join(job).join(format!("{attempt}.acked"))
    }

    /// Number of acknowledged lines of an attempt (persisted, or dropped over the limit).
    pub async fn lines(&self, job: &str, attempt: u32) -> io::Result<u64> {
        Ok(self.state(job, attempt).await?.acked)
    }

    async fn state(&self, job: &str, attempt: u32) -> io::Result<AttemptLog> {
        check(job)?;
        let key = (job.to_string(), attempt);
        if let Some(s) = self.inner.state.lock().unwrap().get(&key) {
            return Ok(s);
        }
        let (path, acked_path) = (self.path(job, attempt), self.acked_path(job, attempt));
        let s = tokio::task::spawn_blocking(move || load_state(&path, &acked_path))
            .await
            .map_err(io::Error::other)??;
        Ok(self.inner.state.lock().unwrap().remember(key, s, true))
    }

    /// Writes the marker line if lines of the attempt were dropped (once; idempotent). Call it
    /// when every line of the attempt is acknowledged, before its end is made visible.
    pub async fn seal(&self, job: &str, attempt: u32) -> io::Result<()> {
        let w = self.inner.write.lock().await;
        if w.ids.contains(job) {
            return Ok(());
        }
        let mut s = self.state(job, attempt).await?;
        if s.sealed || s.dropped() == 0 {
            return Ok(());
        }
        let marker = format!(
            "[runyard] log limit {} reached: {} lines dropped\n",
            format_size(self.inner.limit),
            s.dropped()
        );
        let (path, acked_path) = (self.path(job, attempt), self.acked_path(job, attempt));
        let acked = s.acked;
        let len = marker.len() as u64;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
            f.write_all(marker.as_bytes())?;
            f.sync_data()?;
            write_acked(&acked_path, acked, true)
        })
        .await
        .map_err(io::Error::other)??;
        s.sealed = true;
        s.bytes += len;
        self.changed(job, attempt, s);
        Ok(())
    }

    /// Removes every attempt's lines of a job.
    pub async fn remove(&self, job: &str) -> io::Result<()> {
        check(job)?;
        let mut w = self.inner.write.lock().await;
        w.insert(job);
        self.inner
            .state
            .lock()
            .unwrap()
            .map
            .retain(|(j, _), _| j != job);
        let dir = self.inner.root.join(job);
        tokio::task::spawn_blocking(move || match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Records what was written to an attempt's log and wakes its followers.
    fn changed(&self, job: &str, attempt: u32, s: AttemptLog) {
        self.inner
            .state
            .lock()
            .unwrap()
            .remember((job.to_string(), attempt), s, false);
        let notify = self.inner.notify.lock().unwrap();
        if let Some(tx) = notify.get(job) {
            tx.send_modify(|v| *v += 1);
        }
    }

    /// Appends `count` lines (`data` = lines joined by `\n`) numbered from `first_seq`.
    pub async fn append(
        &self,
        job: &str,
        attempt: u32,
        first_seq: u64,
        count: u32,
        data: bytes::Bytes,
    ) -> io::Result<Appended> {
        let w = self.inner.write.lock().await;
        if w.ids.contains(job) {
            // The job was deleted while these lines travelled: acknowledge, keep nothing.
            return Ok(Appended::Through(first_seq + u64::from(count)));
        }
        let mut s = self.state(job, attempt).await?;
        let have = s.acked;
        if first_seq > have {
            return Ok(Appended::Gap(have));
        }
        let end = first_seq + count as u64;
        if end <= have || count == 0 {
            return Ok(Appended::Through(have));
        }
        let skip = (have - first_seq) as usize;
        let start = nth_line_start(&data, skip).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("log chunk has fewer than {count} lines"),
            )
        })?;
        let new = end - have;
        let mut buf = data.slice(start..).to_vec();
        buf.push(b'\n');
        let (keep, kept) = fitting_lines(&buf, new, s.bytes, self.inner.limit);
        buf.truncate(keep);
        let dropping = kept < new || s.dropped() > 0;
        let (path, acked_path) = (self.path(job, attempt), self.acked_path(job, attempt));
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            if !buf.is_empty() {
                let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
                f.write_all(&buf)?;
                f.sync_data()?;
            }
            if dropping {
                write_acked(&acked_path, end, false)?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)??;
        s.acked = end;
        s.bytes += keep as u64;
        s.kept += kept;
        self.changed(job, attempt, s);
        Ok(Appended::Through(end))
    }

    /// Wakes up whenever lines are appended to any attempt of `job`.
    pub fn subscribe(&self, job: &str) -> watch::Receiver<u64> {
        let mut notify = self.inner.notify.lock().unwrap();
        notify.retain(|_, tx| tx.receiver_count() > 0);
        notify
            .entry(job.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Reads complete lines from byte `offset` on; returns them and the new offset.
    pub async fn read_from(
        &self,
        job: &str,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> io::Result<(Vec<u8>, u64)> {
        check(job)?;
        let path = self.path(job, attempt);
        tokio::task::spawn_blocking(move || read_complete_lines(&path, offset, max))
            .await
            .map_err(io::Error::other)?
    }
}

/// Refuses an id that is not a job id: it would name another path (`..`, an absolute path).
fn check(job: &str) -> io::Result<()> {
    if runyard_model::is_job_id(job) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a job id: {job:?}"),
        ))
    }
}

/// Of `lines` lines in `buf` (each ended by `\n`), how many bytes and lines to keep in a file of
/// `bytes` bytes so that it stops growing once it has reached `limit`.
fn fitting_lines(buf: &[u8], lines: u64, bytes: u64, limit: u64) -> (usize, u64) {
    let mut size = bytes;
    let (mut keep, mut kept) = (0, 0);
    for line in buf.split_inclusive(|&b| b == b'\n') {
        if size >= limit || kept == lines {
            break;
        }
        size += line.len() as u64;
        keep += line.len();
        kept += 1;
    }
    (keep, kept)
}

/// `<attempt>.acked`: `<acked lines>[ sealed]`, replaced atomically.
fn write_acked(path: &Path, acked: u64, sealed: bool) -> io::Result<()> {
    let tmp = path.with_extension("acked.tmp");
    let text = if sealed {
        format!("{acked} sealed\n")
    } else {
        format!("{acked}\n")
    };
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    fs::rename(&tmp, path)
}

fn load_state(path: &Path, acked_path: &Path) -> io::Result<AttemptLog> {
    let kept = count_lines(path)?;
    let bytes = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let (mut acked, mut sealed) = (kept, false);
    match fs::read_to_string(acked_path) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            if let Some(n) = words.next().and_then(|w| w.parse().ok()) {
                acked = n;
            }
            sealed = words.next() == Some("sealed");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The marker line is in the file but is no sequence number.
    let kept = if sealed { kept.saturating_sub(1) } else { kept };
    Ok(AttemptLog {
        acked: acked.max(kept),
        bytes,
        kept,
        sealed,
    })
}

/// `1 GiB`, `512 MiB`, `1500 B`: the largest binary unit that divides the size.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = bytes;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1024 && n.is_multiple_of(1024) {
        n /= 1024;
        unit += 1;
    }
    format!("{n} {}", UNITS[unit])
}

fn count_lines(path: &Path) -> io::Result<u64> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut n = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let len = buf.len();
        r.consume(len);
    }
}

/// Byte index where line `n` (0-based) of `data` starts.
fn nth_line_start(data: &[u8], n: usize) -> Option<usize> {
    if n == 0 {
        return Some(0);
    }
    data.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map(|(i, _)| i + 1)
}

fn read_complete_lines(path: &Path, offset: u64, max: usize) -> io::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take(max as u64).read_to_end(&mut buf)?;
    // Only whole lines: a concurrent append may be half-visible.
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => {
            buf.truncate(i + 1);
            let n = buf.len() as u64;
            Ok((buf, offset + n))
        }
        None => Ok((Vec::new(), offset)),
    }
}

#[cfg(test)]
mod tests {
    const J: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";

    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_state_cache_is_bounded_and_keeps_the_recently_changed() {
        let mut states = States::default();
        let one = AttemptLog {
            acked: 1,
            ..AttemptLog::default()
        };
        for i in 0..STATES_CACHED * 3 {
            states.remember((format!("job{i}"), 1), one, false);
            // One attempt keeps changing: it is never the one dropped.
            states.remember(("busy".into(), 1), one, false);
        }
        assert!(states.map.len() <= STATES_CACHED);
        assert!(states.get(&("busy".into(), 1)).is_some());
        assert!(
            states
                .get(&(format!("job{}", STATES_CACHED * 3 - 1), 1))
                .is_some()
        );
        assert!(states.get(&("job0".into(), 1)).is_none());
        // A load never replaces a state a change recorded meanwhile.
        let newer = AttemptLog {
            acked: 9,
            ..AttemptLog::default()
        };
        states.remember(("busy".into(), 1), newer, false);
        assert_eq!(states.remember(("busy".into(), 1), one, true).acked, 9);
    }

    #[tokio::test]
    async fn lines_that_arrive_after_a_remove_are_acknowledged_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        logs.append(J, 1, 0, 2, Bytes::from("a\nb")).await.unwrap();
        logs.remove(J).await.unwrap();
        assert!(!dir.path().join(J).exists());
        // A chunk that raced the delete: acknowledged through its end, nothing recreated.
        assert_eq!(
            logs.append(J, 1, 2, 3, Bytes::from("c\nd\ne"))
                .await
                .unwrap(),
            Appended::Through(5)
        );
        logs.seal(J, 1).await.unwrap();
        assert!(!dir.path().join(J).exists());
    }

    #[tokio::test]
    async fn evicted_states_load_again_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        logs.append(J, 1, 0, 2, Bytes::from("a\nb")).await.unwrap();
        logs.inner.state.lock().unwrap().map.clear();
        assert_eq!(logs.lines(J, 1).await.unwrap(), 2);
        assert_eq!(
            logs.append(J, 1, 1, 2, Bytes::from("b\nc")).await.unwrap(),
            Appended::Through(3)
        );
    }

    #[tokio::test]
    async fn appends_are_idempotent_and_gapless() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            logs.append(J, 1, 0, 2, Bytes::from("a\nb")).await.unwrap(),
            Appended::Through(2)
        );
        // Resent overlapping chunk adds only the tail.
        assert_eq!(
            logs.append(J, 1, 1, 3, Bytes::from("b\nc\nd"))
                .await
                .unwrap(),
            Appended::Through(4)
        );
        // Full duplicate: nothing.
        assert_eq!(
            logs.append(J, 1, 0, 1, Bytes::from("a")).await.unwrap(),
            Appended::Through(4)
        );
        // Gap: refused.
        assert_eq!(
            logs.append(J, 1, 9, 1, Bytes::from("z")).await.unwrap(),
            Appended::Gap(4)
        );
        // Empty lines are lines.
        assert_eq!(
            logs.append(J, 1, 4, 2, Bytes::from("\n")).await.unwrap(),
            Appended::Through(6)
        );
        let (text, off) = logs.read_from(J, 1, 0, 1 << 20).await.unwrap();
        assert_eq!(text, b"a\nb\nc\nd\n\n\n");
        assert_eq!(off, text.len() as u64);
        // A new store over the same dir counts the persisted lines.
        let again = LogStore::open(dir.path()).unwrap();
        assert_eq!(again.lines(J, 1).await.unwrap(), 6);
        assert_eq!(again.lines(J, 2).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn followers_are_woken() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        let mut rx = logs.subscribe(J);
        logs.append(J, 1, 0, 1, Bytes::from("x")).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
    }

    /// Appends `count` lines numbered from `first` to attempt 1 of job `j`.
    async fn put(logs: &LogStore, first: u64, count: u32, data: &'static str) -> Appended {
        logs.append(J, 1, first, count, Bytes::from(data))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn lines_past_the_limit_are_acknowledged_dropped_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::with_limit(dir.path(), 8).unwrap();
        // "aaa\n" "bbb\n" fill 8 bytes; "ccc" and the rest are dropped but acknowledged.
        assert_eq!(
            put(&logs, 0, 3, "aaa\nbbb\nccc").await,
            Appended::Through(3)
        );
        assert_eq!(put(&logs, 3, 2, "d\ne").await, Appended::Through(5));
        // A resend of dropped lines changes nothing; a gap is still refused.
        assert_eq!(put(&logs, 4, 1, "e").await, Appended::Through(5));
        assert_eq!(put(&logs, 9, 1, "z").await, Appended::Gap(5));
        logs.seal(J, 1).await.unwrap();
        logs.seal(J, 1).await.unwrap();
        let (text, _) = logs.read_from(J, 1, 0, 1 << 20).await.unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "aaa\nbbb\n[runyard] log limit 8 B reached: 3 lines dropped\n"
        );
        assert_eq!(logs.lines(J, 1).await.unwrap(), 5);
        // After a restart the acknowledged count and the seal are still known.
        let again = LogStore::with_limit(dir.path(), 8).unwrap();
        assert_eq!(again.lines(J, 1).await.unwrap(), 5);
        again.seal(J, 1).await.unwrap();
        let (text, _) = again.read_from(J, 1, 0, 1 << 20).await.unwrap();
        assert_eq!(
            String::from_utf8(text)
                .unwrap()
                .matches("[runyard]")
                .count(),
            1
        );
        // Under the limit nothing is dropped and sealing writes nothing.
        logs.append(J, 2, 0, 1, Bytes::from("x")).await.unwrap();
        logs.seal(J, 2).await.unwrap();
        assert_eq!(logs.read_from(J, 2, 0, 100).await.unwrap().0, b"x\n");
        // Removing the job removes every attempt.
        logs.remove(J).await.unwrap();
        assert_eq!(logs.lines(J, 1).await.unwrap(), 0);
        assert!(!dir.path().join(J).exists());
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(1500), "1500 B");
    }

    #[tokio::test]
    async fn ids_that_are_not_job_ids_touch_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path().join("logs")).unwrap();
        let outside = dir.path().join("outside");
        for bad in ["../outside", outside.to_str().unwrap(), "", "j"] {
            let err = logs.append(bad, 1, 0, 1, Bytes::from("x")).await;
            assert_eq!(
                err.unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad}"
            );
            assert!(logs.lines(bad, 1).await.is_err(), "{bad}");
            assert!(logs.read_from(bad, 1, 0, 10).await.is_err(), "{bad}");
            assert!(logs.remove(bad).await.is_err(), "{bad}");
        }
        assert!(!outside.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "only logs/");
    }

    #[test]
    fn partial_lines_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        fs::write(&p, "one\ntw").unwrap();
        assert_eq!(
            read_complete_lines(&p, 0, 100).unwrap(),
            (b"one\n".to_vec(), 4)
        );
        assert_eq!(read_complete_lines(&p, 4, 100).unwrap(), (Vec::new(), 4));
    }
}
