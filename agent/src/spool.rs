//! The log spool of one attempt: every line the process printed, on disk, numbered from 0,
//! until the controller acknowledges it.
//!
//! Invariants: lines are appended in order and never rewritten; `acked <= lines`; a chunk read
//! from sequence number S holds lines S, S+1, ... exactly as appended, so resending after a
//! reconnect repeats lines the controller may have (it deduplicates by number) and never skips
//! one. Memory is bounded by one mark per unacknowledged append batch, not by log size.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest chunk sent in one message.
pub const MAX_CHUNK: usize = 1 << 20;

pub struct Spool {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    lines: u64,
    bytes: u64,
    acked: u64,
    /// (first sequence number of a batch, its byte offset), oldest first, covering every
    /// unacknowledged line.
    marks: VecDeque<(u64, u64)>,
}

/// A run of consecutive lines ready to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub first_seq: u64,
    pub count: u32,
    /// The lines joined by `\n`, without a trailing newline.
    pub data: Vec<u8>,
}

impl Spool {
    pub fn create(path: impl Into<PathBuf>) -> io::Result<Spool> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        Ok(Spool {
            path,
            state: Mutex::new(State {
                file,
                lines: 0,
                bytes: 0,
                acked: 0,
                marks: VecDeque::from([(0, 0)]),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a batch of lines (none may contain `\n`).
    pub fn append(&self, lines: &[String]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        let mut st = self.state.lock().unwrap();
        st.file.write_all(&buf)?;
        let mark = (st.lines, st.bytes);
        if st.marks.back() != Some(&mark) {
            st.marks.push_back(mark);
        }
        st.lines += lines.len() as u64;
        st.bytes += buf.len() as u64;
        Ok(())
    }

    /// Number of lines appended so far.
    pub fn lines(&self) -> u64 {
        self.state.lock().unwrap().lines
    }

    pub fn acked(&self) -> u64 {
        self.state.lock().unwrap().acked
    }

    /// The controller has persisted every line below `next_seq`.
    pub fn ack(&self, next_seq: u64) {
        let mut st = self.state.lock().unwrap();
        let next = next_seq.min(st.lines);
        if next <= st.acked {
            return;
        }
        st.acked = next;
        // Keep the last mark at or below the acknowledged position.
        while st.marks.len() > 1 && st.marks[1].0 <= next {
            st.marks.pop_front();
        }
    }

    /// Reads up to about `MAX_CHUNK` bytes of lines from `from_seq` on; `None` when there are none.
    pub fn read(&self, from_seq: u64) -> io::Result<Option<Chunk>> {
        // The chunk is read outside the lock: lines below `end_byte` are never rewritten.
        let (mut file, mark, end_seq, end_byte) = {
            let st = self.state.lock().unwrap();
            if from_seq >= st.lines {
                return Ok(None);
            }
            let mark = st
                .marks
                .iter()
                .rev()
                .find(|(s, _)| *s <= from_seq)
                .copied()
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("line {from_seq} was acknowledged and dropped"),
                    )
                })?;
            // A handle of its own: a clone would share the writer's file position.
            (File::open(&self.path)?, mark, st.lines, st.bytes)
        };
        file.seek(SeekFrom::Start(mark.1))?;
        let mut r = BufReader::with_capacity(256 << 10, file.take(end_byte - mark.1));
        let mut line = Vec::new();
        // Skip the lines of the batch before `from_seq`.
        for _ in mark.0..from_seq {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "spool shorter than its line count",
                ));
            }
        }
        // Take whole lines up to MAX_CHUNK bytes (at least one).
        let mut data = Vec::with_capacity(MAX_CHUNK.min((end_byte - mark.1) as usize));
        let mut count = 0u32;
        while from_seq + (count as u64) < end_seq {
            let buf = r.fill_buf()?;
            let Some(i) = memchr::memchr(b'\n', buf) else {
                // A line spanning the buffer: read it whole.
                line.clear();
                r.read_until(b'\n', &mut line)?;
                if count > 0 && data.len() + line.len() > MAX_CHUNK {
                    break;
                }
                data.extend_from_slice(&line);
                count += 1;
                continue;
            };
            if count > 0 && data.len() + i + 1 > MAX_CHUNK {
                break;
            }
            data.extend_from_slice(&buf[..=i]);
            r.consume(i + 1);
            count += 1;
        }
        if count == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "spool has no line at the expected place",
            ));
        }
        data.pop();
        Ok(Some(Chunk {
            first_seq: from_seq,
            count,
            data,
        }))
    }

    /// Deletes the spool file.
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(r: std::ops::Range<u32>) -> Vec<String> {
        r.map(|i| format!("line {i}")).collect()
    }

    fn read_all(s: &Spool, mut from: u64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(c) = s.read(from).unwrap() {
            assert_eq!(c.first_seq, from);
            let text = String::from_utf8(c.data).unwrap();
            let got: Vec<String> = text.split('\n').map(str::to_string).collect();
            assert_eq!(got.len(), c.count as usize);
            from += c.count as u64;
            out.extend(got);
        }
        out
    }

    #[test]
    fn reads_from_any_line_and_after_acks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::create(dir.path().join("a/1.log")).unwrap();
        s.append(&lines(0..10)).unwrap();
        s.append(&lines(10..20)).unwrap();
        s.append(&[String::new(), "x".into()]).unwrap();
        assert_eq!(s.lines(), 22);
        assert_eq!(read_all(&s, 0).len(), 22);
        assert_eq!(read_all(&s, 13)[0], "line 13");
        assert_eq!(read_all(&s, 20), vec!["".to_string(), "x".to_string()]);
        s.ack(15);
        assert_eq!(s.acked(), 15);
        assert_eq!(read_all(&s, 15)[0], "line 15");
        assert_eq!(read_all(&s, 16).len(), 6);
        s.ack(3); // never goes back
        assert_eq!(s.acked(), 15);
        assert!(s.read(22).unwrap().is_none());
    }

    #[test]
    fn reads_while_appending_never_disturb_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Spool::create(dir.path().join("c.log")).unwrap());
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for b in 0..200u32 {
                    s.append(&lines(b * 600..(b + 1) * 600)).unwrap();
                }
            })
        };
        let mut next = 0u64;
        let mut got = Vec::new();
        while next < 120_000 {
            match s.read(next).unwrap() {
                Some(c) => {
                    let text = String::from_utf8(c.data).unwrap();
                    got.extend(text.split('\n').map(str::to_string));
                    next += c.count as u64;
                    s.ack(next);
                }
                None => std::thread::yield_now(),
            }
        }
        writer.join().unwrap();
        assert_eq!(got, lines(0..120_000));
    }

    #[test]
    fn chunks_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::create(dir.path().join("b.log")).unwrap();
        let big: Vec<String> = (0..5000).map(|i| format!("{i:0>500}")).collect();
        s.append(&big).unwrap();
        let c = s.read(0).unwrap().unwrap();
        assert!(c.data.len() <= MAX_CHUNK);
        assert!(c.count > 1000);
        assert_eq!(read_all(&s, 0), big);
    }
}
