//! The log store: each attempt's lines in a plain file under `<data_dir>/logs/<job>/<attempt>.log`,
//! one line per `\n`, numbered by position (line N of the file has sequence number N).
//!
//! Invariants: a line is acknowledged to the agent only after it is written and fsynced, so a
//! controller crash loses no acknowledged line; appends are idempotent by sequence number (a
//! resent chunk overlapping persisted lines only adds the new tail), so reconnects never
//! duplicate a line; a gap (lines missing before the chunk) is refused, and the agent resends from
//! the acknowledged position. Job ids name directories, so every entry point refuses an id that
//! is not a job id (`runyard_model::is_job_id`), whoever the caller.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Persisted line count per (job, attempt), loaded lazily from the files.
    lines: Mutex<HashMap<(String, u32), u64>>,
    /// Bumped on every append to a job, for followers.
    notify: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Serializes appends per process; appends are short.
    write: tokio::sync::Mutex<()>,
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Persisted; the attempt had `from` lines before this append and now has `to` (lines
    /// `from..to` are new; none when equal).
    Through { from: u64, to: u64 },
    /// The chunk starts after the persisted end: resend from this sequence number.
    Gap(u64),
}

impl LogStore {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<LogStore> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                root,
                lines: Mutex::new(HashMap::new()),
                notify: Mutex::new(HashMap::new()),
                write: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The file of an attempt; refuses an id that is not a job id (it would name another path).
    pub fn path(&self, job: &str, attempt: u32) -> io::Result<PathBuf> {
        if !runyard_model::is_job_id(job) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a job id: {job:?}"),
            ));
        }
        Ok(self.inner.root.join(job).join(format!("{attempt}.log")))
    }

    /// Number of persisted lines of an attempt.
    pub async fn lines(&self, job: &str, attempt: u32) -> io::Result<u64> {
        let key = (job.to_string(), attempt);
        if let Some(n) = self.inner.lines.lock().unwrap().get(&key) {
            return Ok(*n);
        }
        let path = self.path(job, attempt)?;
        let n = tokio::task::spawn_blocking(move || count_lines(&path))
            .await
            .map_err(io::Error::other)??;
        self.inner.lines.lock().unwrap().entry(key).or_insert(n);
        Ok(n)
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
        let _w = self.inner.write.lock().await;
        let have = self.lines(job, attempt).await?;
        if first_seq > have {
            return Ok(Appended::Gap(have));
        }
        let end = first_seq + count as u64;
        if end <= have || count == 0 {
            return Ok(Appended::Through {
                from: have,
                to: have,
            });
        }
        let skip = (have - first_seq) as usize;
        let start = nth_line_start(&data, skip).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("log chunk has fewer than {count} lines"),
            )
        })?;
        let path = self.path(job, attempt)?;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
            let mut buf = Vec::with_capacity(data.len() - start + 1);
            buf.extend_from_slice(&data[start..]);
            buf.push(b'\n');
            f.write_all(&buf)?;
            f.sync_data()
        })
        .await
        .map_err(io::Error::other)??;
        self.inner
            .lines
            .lock()
            .unwrap()
            .insert((job.to_string(), attempt), end);
        let notify = self.inner.notify.lock().unwrap();
        if let Some(tx) = notify.get(job) {
            tx.send_modify(|v| *v += 1);
        }
        Ok(Appended::Through {
            from: have,
            to: end,
        })
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
        let path = self.path(job, attempt)?;
        tokio::task::spawn_blocking(move || read_complete_lines(&path, offset, max))
            .await
            .map_err(io::Error::other)?
    }
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
    use super::*;
    use bytes::Bytes;

    const J: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";

    fn through(from: u64, to: u64) -> Appended {
        Appended::Through { from, to }
    }

    #[tokio::test]
    async fn appends_are_idempotent_and_gapless() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            logs.append(J, 1, 0, 2, Bytes::from("a\nb")).await.unwrap(),
            through(0, 2)
        );
        // Resent overlapping chunk adds only the tail.
        assert_eq!(
            logs.append(J, 1, 1, 3, Bytes::from("b\nc\nd"))
                .await
                .unwrap(),
            through(2, 4)
        );
        // Full duplicate: nothing.
        assert_eq!(
            logs.append(J, 1, 0, 1, Bytes::from("a")).await.unwrap(),
            through(4, 4)
        );
        // Gap: refused.
        assert_eq!(
            logs.append(J, 1, 9, 1, Bytes::from("z")).await.unwrap(),
            Appended::Gap(4)
        );
        // Empty lines are lines.
        assert_eq!(
            logs.append(J, 1, 4, 2, Bytes::from("\n")).await.unwrap(),
            through(4, 6)
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
