//! The log-throughput workload: a Python script writing numbered fixed-width lines to stdout in
//! ~1 MiB blocks, and a streaming checker for what a follower receives.
//!
//! Line `i` is `format!("{i:010} ")` padded with `x` to `LINE_BYTES - 1` bytes, then `\n`.
//! Invariant of the checker: it accepts a stream only if it holds exactly lines 0..n in order,
//! each well formed, with nothing after the last newline.

/// Bytes per line, newline included.
pub const LINE_BYTES: usize = 100;
const NUMBER_DIGITS: usize = 10;

/// The job script; its one argument is the number of lines to print.
pub const SCRIPT: &str = r#"import sys

LINE = 100
FMT = b"%010d " + b"x" * (LINE - 12) + b"\n"
PER_BLOCK = (1 << 20) // LINE


def main():
    total = int(sys.argv[1])
    out = sys.stdout.buffer
    block = FMT * PER_BLOCK
    i = 0
    while i < total:
        end = min(i + PER_BLOCK, total)
        fmt = block if end - i == PER_BLOCK else FMT * (end - i)
        # One formatting operation and one write per ~1 MiB block: the producer must outrun
        # the log path it measures.
        out.write(fmt % tuple(range(i, end)))
        i = end
    out.flush()


main()
"#;

/// Lines needed for about `bytes` bytes of log.
pub fn lines_for(bytes: u64) -> u64 {
    bytes.div_ceil(LINE_BYTES as u64)
}

/// The expected text of line `i` (with its newline), for tests.
pub fn line(i: u64) -> String {
    let mut s = format!("{i:010} ");
    s.push_str(&"x".repeat(LINE_BYTES - 1 - s.len()));
    s.push('\n');
    s
}

/// Checks a byte stream of numbered lines as it arrives, chunk boundaries anywhere.
#[derive(Debug, Default)]
pub struct LineCheck {
    /// Bytes fed so far.
    pub bytes: u64,
    /// Complete lines seen so far (= the next expected number while the stream is good).
    pub lines: u64,
    partial: Vec<u8>,
    /// The first defect, if any.
    pub error: Option<String>,
}

impl LineCheck {
    pub fn new() -> LineCheck {
        LineCheck::default()
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        if !self.partial.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                None => {
                    self.partial.extend_from_slice(data);
                    return;
                }
                Some(i) => {
                    let mut l = std::mem::take(&mut self.partial);
                    l.extend_from_slice(&data[..i]);
                    self.check(&l);
                    data = &data[i + 1..];
                }
            }
        }
        // The checker shares the CPU with what it measures: a well-formed line (which holds no
        // `\n`) is recognised by its fixed width without scanning for the break.
        while data.len() >= LINE_BYTES {
            let (line, rest) = data.split_at(LINE_BYTES - 1);
            if rest[0] != b'\n' || !self.well_formed(line) {
                break;
            }
            self.lines += 1;
            data = &rest[1..];
        }
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            self.check(&data[..i]);
            data = &data[i + 1..];
        }
        self.partial.extend_from_slice(data);
    }

    /// Line number `self.lines`, exactly as the script prints it.
    fn well_formed(&self, l: &[u8]) -> bool {
        const PAD: [u8; LINE_BYTES - NUMBER_DIGITS - 2] = [b'x'; LINE_BYTES - NUMBER_DIGITS - 2];
        if l.len() != LINE_BYTES - 1 || l[NUMBER_DIGITS] != b' ' || l[NUMBER_DIGITS + 1..] != PAD {
            return false;
        }
        let mut n = 0u64;
        for &d in &l[..NUMBER_DIGITS] {
            if !d.is_ascii_digit() {
                return false;
            }
            n = n * 10 + u64::from(d - b'0');
        }
        n == self.lines
    }

    fn check(&mut self, l: &[u8]) {
        if self.error.is_none() && !self.well_formed(l) {
            let n = self.lines;
            let shown = String::from_utf8_lossy(&l[..l.len().min(40)]);
            self.error = Some(format!("line {n}: expected number {n}, got `{shown}`"));
        }
        self.lines += 1;
    }

    /// Ok if the stream was exactly lines `0..expected`.
    pub fn finish(&self, expected: u64) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if !self.partial.is_empty() {
            return Err(format!(
                "{} bytes after the last newline",
                self.partial.len()
            ));
        }
        if self.lines != expected {
            return Err(format!(
                "got {} lines, expected {expected} (last number {})",
                self.lines,
                self.lines.saturating_sub(1)
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: u64) -> Vec<u8> {
        (0..n).flat_map(|i| line(i).into_bytes()).collect()
    }

    #[test]
    fn accepts_the_stream_split_anywhere() {
        let t = text(50);
        for step in [1, 7, 99, 100, 101, 4096] {
            let mut c = LineCheck::new();
            for chunk in t.chunks(step) {
                c.feed(chunk);
            }
            assert_eq!(c.finish(50), Ok(()), "step {step}");
            assert_eq!(c.bytes, 5000);
        }
    }

    #[test]
    fn finds_lost_duplicated_and_truncated_lines() {
        let t = text(10);
        let mut lost = LineCheck::new();
        lost.feed(&t[..300]);
        lost.feed(&t[400..]);
        assert!(lost.finish(10).unwrap_err().contains("line 3"));

        let mut dup = LineCheck::new();
        dup.feed(&t[..200]);
        dup.feed(&t[100..]);
        assert!(dup.finish(10).unwrap_err().contains("line 2"));

        let mut short = LineCheck::new();
        short.feed(&t[..900]);
        assert!(short.finish(10).unwrap_err().contains("got 9 lines"));

        let mut garbled = t.clone();
        garbled[750] = b'y';
        let mut g = LineCheck::new();
        g.feed(&garbled);
        assert!(g.finish(10).unwrap_err().contains("line 7"));

        let mut cut = LineCheck::new();
        cut.feed(&t[..950]);
        assert!(
            cut.finish(10)
                .unwrap_err()
                .contains("after the last newline")
        );
    }

    #[test]
    fn the_script_prints_what_the_checker_wants() {
        let out = std::process::Command::new("python3")
            .args(["-c", SCRIPT, "25000"])
            .output()
            .expect("python3 runs");
        assert!(out.status.success());
        let mut c = LineCheck::new();
        c.feed(&out.stdout);
        assert_eq!(c.finish(25_000), Ok(()));
        assert_eq!(lines_for(2_500_000), 25_000);
    }
}
