//! The progress bar of `logs -f` and `submit --follow`: one status line kept at the bottom of
//! the terminal on stderr, e.g. `[#########...........] 67% epoch 2/3 step 40/60 ETA 0:12
//! val_loss=0.41`, fed by polling the job about once a second.
//!
//! Invariants: the line exists only when stderr is a terminal (and `TERM` is not `dumb`) and the
//! job reports progress; otherwise followed logs are written exactly as without it. When stdout
//! shares that terminal, the line is cleared before log bytes are written and put back right
//! after them, but only when the log ends at the start of a line (a partial line is never
//! drawn over). New content is rendered at most every `MIN_REDRAW`. Rendering and the ETA are
//! pure (the time is passed in); stderr write failures only cost the bar, never the logs.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IsTerminal, Stderr, Stdout, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use runyard_api::JobView;
use runyard_model::Progress;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::ApiClient;
use crate::output;

/// Characters between the bar's brackets.
pub const BAR_WIDTH: usize = 20;
/// New bar content is drawn at most this often (about 4 times a second).
pub const MIN_REDRAW: Duration = Duration::from_millis(200);
/// How often the drawing task wakes to render (the ETA counts down between polls).
const TICK: Duration = Duration::from_millis(250);
/// How often the job is polled for its progress while following.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A poll slower than this is abandoned; the next tick polls again.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// The ETA comes from the progress rate over at most this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Carriage return, then erase the whole line (ECMA-48 EL 2).
const CLEAR_LINE: &[u8] = b"\r\x1b[2K";
/// Terminal width when the terminal does not say.
const DEFAULT_COLUMNS: usize = 80;

/// Estimates the time left from the rate at which the fraction done grows.
#[derive(Debug, Default)]
pub struct Eta {
    /// (when seen, fraction), oldest first; fractions never decrease within it.
    samples: VecDeque<(Instant, f64)>,
}

impl Eta {
    /// Records the fraction seen at `now`; a fraction going back (a new attempt) starts over.
    pub fn observe(&mut self, now: Instant, fraction: f64) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        if self.samples.back().is_some_and(|&(_, f)| fraction < f) {
            self.samples.clear();
        }
        self.samples.push_back((now, fraction));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|&(t, _)| now.saturating_duration_since(t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Forgets every sample (the job moved to another attempt).
    pub fn reset(&mut self) {
        self.samples.clear();
    }

    /// Time left at `now`: the remaining fraction at the recent rate, counted down since the
    /// last sample. `None` until the fraction has grown between two samples.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let &(first_at, first) = self.samples.front()?;
        let &(last_at, last) = self.samples.back()?;
        if last >= 1.0 {
            return Some(Duration::ZERO);
        }
        let elapsed = last_at.saturating_duration_since(first_at).as_secs_f64();
        if elapsed <= 0.0 || last <= first {
            return None;
        }
        let rate = (last - first) / elapsed;
        let since = now.saturating_duration_since(last_at).as_secs_f64();
        let left = ((1.0 - last) / rate - since).max(0.0).round();
        Duration::try_from_secs_f64(left).ok()
    }
}

/// `M:SS`, or `H:MM:SS` from an hour on.
pub fn format_eta(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Whole percent done; 100 only when the fraction is 1 (a nearly done run shows 99).
pub fn percent(fraction: f64) -> u32 {
    if !fraction.is_finite() || fraction <= 0.0 {
        return 0;
    }
    if fraction >= 1.0 {
        return 100;
    }
    ((fraction * 100.0).round() as u32).min(99)
}

/// `epoch 2/3 step 40/60`: totals when known; the step only once there is one.
pub fn position(p: &Progress, separator: &str) -> String {
    let mut s = match p.max_epochs {
        Some(max) => format!("epoch {}/{max}", p.epoch),
        None => format!("epoch {}", p.epoch),
    };
    match p.max_steps {
        Some(max) => s.push_str(&format!("{separator}step {}/{max}", p.step)),
        None if p.step > 0 => s.push_str(&format!("{separator}step {}", p.step)),
        None => {}
    }
    s
}

/// The metric the bar shows: the one the best checkpoint monitors, else the first by name.
fn shown_metric(job: &JobView) -> Option<(&str, f64)> {
    let monitor = job.best.as_ref().and_then(|b| b.monitor.as_deref());
    if let Some((name, value)) = monitor.and_then(|m| job.metrics.get_key_value(m)) {
        return Some((name, *value));
    }
    job.metrics.iter().next().map(|(k, v)| (k.as_str(), *v))
}

/// `v` to `digits` significant digits, without trailing zeros: with 4, `0.41`, `123.5`,
/// `1.235e6`; scientific notation below 0.001 and from 10^(digits+1) on.
pub fn significant(v: f64, digits: usize) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = digits.max(1);
    let magnitude = v.abs().log10().floor() as i64;
    if magnitude < -3 || magnitude > digits as i64 {
        let s = format!("{v:.prec$e}", prec = digits - 1);
        return match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_fraction(mantissa)),
            None => s,
        };
    }
    let decimals = (digits as i64 - 1 - magnitude).max(0) as usize;
    trim_fraction(&format!("{v:.decimals$}")).to_string()
}

/// `1.500` -> `1.5`, `2.000` -> `2`; a number without a fraction is kept.
fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The bar line for `job`, cut to fit `columns` (one column is left free so the terminal
/// never wraps it); `None` when the job reports no progress.
pub fn bar_line(job: &JobView, eta: Option<Duration>, columns: usize) -> Option<String> {
    let p = job.progress.as_ref()?;
    let fraction = if p.fraction.is_finite() {
        p.fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let filled = ((fraction * BAR_WIDTH as f64).floor() as usize).min(BAR_WIDTH);
    let mut line = format!(
        "[{}{}] {}% {}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        percent(fraction),
        position(p, " ")
    );
    if let Some(eta) = eta {
        line.push_str(&format!(" ETA {}", format_eta(eta)));
    }
    if let Some((name, value)) = shown_metric(job) {
        line.push_str(&format!(" {name}={}", significant(value, 4)));
    }
    let fit = columns.saturating_sub(1).max(1);
    Some(line.chars().take(fit).collect())
}

/// Keeps one status line at the bottom of `err` while log bytes go to `out`.
pub struct StatusLine<O: Write, E: Write> {
    out: O,
    err: E,
    /// `out` writes to the same terminal as `err`.
    shared: bool,
    /// What the line should show; `None` hides it.
    text: Option<String>,
    /// What the line shows on the screen now; `None` when it is not there.
    drawn: Option<String>,
    /// The last log byte written ended a line (or none was written).
    at_line_start: bool,
    drawn_at: Option<Instant>,
    /// `finish` was called: nothing is drawn any more.
    closed: bool,
}

impl<O: Write, E: Write> StatusLine<O, E> {
    pub fn new(out: O, err: E, shared: bool) -> Self {
        StatusLine {
            out,
            err,
            shared,
            text: None,
            drawn: None,
            at_line_start: true,
            drawn_at: None,
            closed: false,
        }
    }

    /// Sets what the line shows; it is drawn now unless something was drawn less than
    /// `MIN_REDRAW` ago (a later update draws it then) or the log is mid-line.
    pub fn update(&mut self, text: Option<String>, now: Instant) {
        if self.closed {
            return;
        }
        self.text = text;
        let limited = self
            .drawn_at
            .is_some_and(|t| now.saturating_duration_since(t) < MIN_REDRAW);
        if self.drawn == self.text || !self.may_draw() || limited {
            return;
        }
        self.draw(now);
    }

    /// Writes log bytes to `out`, moving the line out of their way when they share a terminal.
    /// Only a failure to write `out` is an error.
    pub fn log(&mut self, bytes: &[u8], now: Instant) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.shared && self.drawn.is_some() {
            self.clear();
        }
        self.out.write_all(bytes)?;
        self.out.flush()?;
        self.at_line_start = bytes.ends_with(b"\n");
        if self.shared && !self.closed {
            // Putting the line back is not a new rendering: no rate limit.
            self.draw(now);
        }
        Ok(())
    }

    /// Writes a line of its own to `err`, above the status line.
    pub fn note(&mut self, line: &str, now: Instant) {
        if self.drawn.is_some() {
            self.clear();
        }
        let _ = writeln!(self.err, "{line}").and_then(|()| self.err.flush());
        if !self.closed {
            self.draw(now);
        }
    }

    /// Removes the line for good; later updates draw nothing.
    pub fn finish(&mut self) {
        if self.drawn.is_some() {
            self.clear();
        }
        self.closed = true;
    }

    /// The line may go on the screen: its own terminal, or the log is at a line start.
    fn may_draw(&self) -> bool {
        !self.shared || self.at_line_start
    }

    fn draw(&mut self, now: Instant) {
        match &self.text {
            Some(text) if self.may_draw() => {
                let mut bytes = CLEAR_LINE.to_vec();
                bytes.extend_from_slice(text.as_bytes());
                // A failed stderr write costs the bar only.
                let written = self
                    .err
                    .write_all(&bytes)
                    .and_then(|()| self.err.flush())
                    .is_ok();
                self.drawn = written.then(|| text.clone());
                self.drawn_at = Some(now);
            }
            _ if self.drawn.is_some() => self.clear(),
            _ => {}
        }
    }

    fn clear(&mut self) {
        let _ = self
            .err
            .write_all(CLEAR_LINE)
            .and_then(|()| self.err.flush());
        self.drawn = None;
    }
}

type TerminalLine = Arc<Mutex<StatusLine<Stdout, Stderr>>>;

fn lock(line: &TerminalLine) -> MutexGuard<'_, StatusLine<Stdout, Stderr>> {
    // A panic elsewhere mid-write leaves at worst a garbled bar: keep going.
    line.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where followed logs and notes go: plain stdout and stderr, or with a progress bar.
pub struct FollowDisplay {
    bar: Option<(TerminalLine, CancellationToken, JoinHandle<()>)>,
}

impl FollowDisplay {
    /// A bar fed by polling job `id` when stderr is a terminal; plain output otherwise.
    pub fn start(client: &ApiClient, id: &str) -> FollowDisplay {
        let Some(shared) = terminal_stderr() else {
            return FollowDisplay { bar: None };
        };
        let line = Arc::new(Mutex::new(StatusLine::new(
            io::stdout(),
            io::stderr(),
            shared,
        )));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            poll_and_draw(client.clone(), id.to_string(), line.clone(), cancel.clone())
                .instrument(tracing::debug_span!("progress_bar", job = %id)),
        );
        FollowDisplay {
            bar: Some((line, cancel, task)),
        }
    }

    /// Whether a bar may be shown (stderr is a terminal).
    pub fn has_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Log bytes to stdout.
    pub fn log(&self, bytes: &[u8]) -> io::Result<()> {
        match &self.bar {
            None => output::write_stdout(bytes),
            Some((line, ..)) => lock(line).log(bytes, Instant::now()),
        }
    }

    /// A line to stderr.
    pub fn note(&self, text: &str) {
        match &self.bar {
            None => eprintln!("{text}"),
            Some((line, ..)) => lock(line).note(text, Instant::now()),
        }
    }

    /// Stops polling and removes the bar from the screen.
    pub async fn finish(self) {
        let Some((line, cancel, task)) = self.bar else {
            return;
        };
        cancel.cancel();
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "progress bar task failed");
        }
        lock(&line).finish();
    }
}

/// Polls the job every `POLL_EVERY` and renders its bar every `TICK` until cancelled.
async fn poll_and_draw(
    client: ApiClient,
    id: String,
    line: TerminalLine,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut job: Option<JobView> = None;
    let mut eta = Eta::default();
    let mut polled: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let due = polled.is_none_or(|t| t.elapsed() >= POLL_EVERY);
        if due && !job.as_ref().is_some_and(|j| j.status.is_terminal()) {
            polled = Some(Instant::now());
            let reply = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(POLL_TIMEOUT, client.job(&id)) => r,
            };
            match reply {
                Ok(Ok(reply)) => {
                    let fresh = reply.value;
                    if job.as_ref().is_some_and(|j| j.attempt != fresh.attempt) {
                        eta.reset();
                    }
                    if let Some(p) = &fresh.progress {
                        eta.observe(Instant::now(), p.fraction);
                    }
                    job = Some(fresh);
                }
                Ok(Err(e)) => tracing::debug!(job = %id, error = %e, "progress poll failed"),
                Err(_) => tracing::debug!(job = %id, "progress poll timed out"),
            }
        }
        let now = Instant::now();
        let text = job
            .as_ref()
            .and_then(|j| bar_line(j, eta.remaining(now), terminal_columns()));
        lock(&line).update(text, now);
    }
}

/// `Some(shared)` when stderr is a terminal that can redraw a line; `shared` when stdout
/// writes to it too (when unsure, it is taken as shared: that only hides the bar more often).
fn terminal_stderr() -> Option<bool> {
    let err = io::stderr();
    if !err.is_terminal() || std::env::var_os("TERM").is_some_and(|t| t == "dumb") {
        return None;
    }
    let out = io::stdout();
    if !out.is_terminal() {
        return Some(false);
    }
    let device = |fd: BorrowedFd<'_>| {
        let file = File::from(fd.try_clone_to_owned().ok()?);
        file.metadata().ok().map(|m| m.rdev())
    };
    Some(match (device(out.as_fd()), device(err.as_fd())) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    })
}

/// Columns of the terminal on stderr (asked each time: it may be resized).
fn terminal_columns() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live one;
    // the descriptor is stderr, open for the whole process.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) };
    if rc == 0 && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        DEFAULT_COLUMNS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::{Best, Job, JobSpec, Timestamp};

    fn job(progress: Option<Progress>) -> JobView {
        let spec = JobSpec::from_value(serde_json::json!({
            "repo": "file:///r",
            "script": "train.py",
        }))
        .unwrap();
        let mut j = JobView::from(&Job::new("j".into(), spec, Timestamp(0)));
        j.progress = progress;
        j
    }

    fn two_thirds() -> Progress {
        Progress {
            epoch: 2,
            max_epochs: Some(3),
            step: 40,
            max_steps: Some(60),
            fraction: 40.0 / 60.0,
        }
    }

    #[test]
    fn no_progress_no_bar() {
        let mut j = job(None);
        j.metrics.insert("loss".into(), 0.5);
        assert_eq!(bar_line(&j, Some(Duration::from_secs(3)), 80), None);
    }

    #[test]
    fn bar_shows_fraction_position_eta_and_the_monitored_metric() {
        let mut j = job(Some(two_thirds()));
        j.metrics.insert("acc".into(), 0.875);
        j.metrics.insert("val_loss".into(), 0.41);
        j.best = Some(Best {
            monitor: Some("val_loss".into()),
            ..Best::default()
        });
        assert_eq!(
            bar_line(&j, Some(Duration::from_secs(12)), 120).unwrap(),
            "[#############.......] 67% epoch 2/3 step 40/60 ETA 0:12 val_loss=0.41"
        );
        // No monitor: the first metric by name; no ETA yet: none shown.
        j.best = None;
        assert_eq!(
            bar_line(&j, None, 120).unwrap(),
            "[#############.......] 67% epoch 2/3 step 40/60 acc=0.875"
        );
        // A monitor that was never logged falls back too.
        j.best = Some(Best {
            monitor: Some("val_acc".into()),
            ..Best::default()
        });
        assert!(bar_line(&j, None, 120).unwrap().ends_with(" acc=0.875"));
    }

    #[test]
    fn bar_width_is_fixed_and_the_line_fits_the_terminal() {
        for (fraction, hashes, pct) in [(0.0, 0, 0), (0.5, 10, 50), (0.999, 19, 99), (1.0, 20, 100)]
        {
            let j = job(Some(Progress {
                fraction,
                ..Progress::default()
            }));
            let line = bar_line(&j, None, 80).unwrap();
            let inside = &line[1..=BAR_WIDTH];
            assert_eq!(inside.len(), BAR_WIDTH, "{line}");
            assert_eq!(inside.matches('#').count(), hashes, "{line}");
            assert_eq!(&line[BAR_WIDTH + 1..BAR_WIDTH + 3], "] ", "{line}");
            assert!(line.contains(&format!(" {pct}% ")), "{line}");
        }
        let mut j = job(Some(two_thirds()));
        j.metrics.insert("a_rather_long_metric_name".into(), 1.0);
        let line = bar_line(&j, Some(Duration::from_secs(5)), 40).unwrap();
        assert_eq!(line.chars().count(), 39, "{line}");
        assert!(line.starts_with("[#############.......] 67% epoch 2/3"));
    }

    #[test]
    fn position_shows_known_totals_only() {
        let p = Progress {
            epoch: 4,
            step: 0,
            ..Progress::default()
        };
        assert_eq!(position(&p, ", "), "epoch 4");
        let p = Progress {
            epoch: 1,
            max_epochs: Some(10),
            step: 7,
            ..Progress::default()
        };
        assert_eq!(position(&p, ", "), "epoch 1/10, step 7");
        assert_eq!(position(&two_thirds(), ", "), "epoch 2/3, step 40/60");
    }

    #[test]
    fn eta_follows_the_rate_of_progress() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut eta = Eta::default();
        assert_eq!(eta.remaining(t0), None);
        eta.observe(at(0), 0.1);
        assert_eq!(eta.remaining(at(0)), None, "one sample gives no rate");
        eta.observe(at(10), 0.1);
        assert_eq!(eta.remaining(at(10)), None, "no growth gives no rate");
        eta.observe(at(20), 0.3);
        // 0.2 in 20 s: 0.01/s, 0.7 left: 70 s, counting down after the sample.
        assert_eq!(eta.remaining(at(20)), Some(Duration::from_secs(70)));
        assert_eq!(eta.remaining(at(50)), Some(Duration::from_secs(40)));
        assert_eq!(eta.remaining(at(200)), Some(Duration::ZERO));
        // Only the last minute counts: a faster pace now shortens the estimate.
        eta.observe(at(90), 0.4);
        eta.observe(at(100), 0.6);
        // The window keeps (90, 0.4) and (100, 0.6): 0.02/s, 0.4 left.
        assert_eq!(eta.remaining(at(100)), Some(Duration::from_secs(20)));
        // Going back (a new attempt) starts over.
        eta.observe(at(110), 0.05);
        assert_eq!(eta.remaining(at(110)), None);
        eta.observe(at(111), 1.0);
        assert_eq!(eta.remaining(at(111)), Some(Duration::ZERO));
    }

    #[test]
    fn eta_and_numbers_format_compactly() {
        assert_eq!(format_eta(Duration::from_secs(12)), "0:12");
        assert_eq!(format_eta(Duration::from_secs(754)), "12:34");
        assert_eq!(format_eta(Duration::from_secs(3723)), "1:02:03");
        assert_eq!(significant(0.41, 4), "0.41");
        assert_eq!(significant(0.123456, 4), "0.1235");
        assert_eq!(significant(123.456, 4), "123.5");
        assert_eq!(significant(12345.0, 4), "12345");
        assert_eq!(significant(2.0, 4), "2");
        assert_eq!(significant(-0.5, 4), "-0.5");
        assert_eq!(significant(0.0, 4), "0");
        assert_eq!(significant(1234567.0, 4), "1.235e6");
        assert_eq!(significant(0.0001234, 4), "1.234e-4");
        assert_eq!(significant(2e7, 4), "2e7");
        assert_eq!(significant(11.0 / 12.0, 6), "0.916667");
        assert_eq!(significant(1.0 / 12.0, 6), "0.0833333");
        assert_eq!(significant(123456.7, 6), "123457");
    }

    /// A status line over two byte buffers, and what each received.
    struct Screen {
        line: StatusLine<Vec<u8>, Vec<u8>>,
    }

    impl Screen {
        fn new(shared: bool) -> Screen {
            Screen {
                line: StatusLine::new(Vec::new(), Vec::new(), shared),
            }
        }
        fn out(&self) -> String {
            String::from_utf8_lossy(&self.line.out).into_owned()
        }
        fn err(&self) -> String {
            String::from_utf8_lossy(&self.line.err).into_owned()
        }
    }

    const CL: &str = "\r\x1b[2K";

    #[test]
    fn log_bytes_clear_the_line_and_put_it_back() {
        let t0 = Instant::now();
        let mut s = Screen::new(true);
        s.line.update(Some("bar 1".into()), t0);
        s.line.log(b"epoch 1\n", t0).unwrap();
        assert_eq!(s.out(), "epoch 1\n");
        assert_eq!(s.err(), format!("{CL}bar 1{CL}{CL}bar 1"));
        // A partial line is not drawn over: the bar waits for its end.
        s.line.log(b"Downloading", t0).unwrap();
        s.line
            .update(Some("bar 2".into()), t0 + Duration::from_secs(1));
        assert_eq!(s.err(), format!("{CL}bar 1{CL}{CL}bar 1{CL}"));
        s.line.log(b" done\n", t0 + Duration::from_secs(1)).unwrap();
        assert!(
            s.err().ends_with(&format!("bar 1{CL}{CL}bar 2")),
            "{:?}",
            s.err()
        );
        assert_eq!(s.out(), "epoch 1\nDownloading done\n");
        s.line.finish();
        s.line
            .update(Some("bar 3".into()), t0 + Duration::from_secs(9));
        s.line.log(b"last\n", t0 + Duration::from_secs(9)).unwrap();
        assert!(s.err().ends_with(&format!("bar 2{CL}")), "{:?}", s.err());
    }

    #[test]
    fn new_content_is_drawn_at_most_every_min_redraw() {
        let t0 = Instant::now();
        let mut s = Screen::new(true);
        s.line.update(Some("a".into()), t0);
        s.line
            .update(Some("b".into()), t0 + Duration::from_millis(50));
        s.line
            .update(Some("b".into()), t0 + Duration::from_millis(100));
        assert_eq!(s.err(), format!("{CL}a"));
        s.line.update(Some("b".into()), t0 + MIN_REDRAW);
        assert_eq!(s.err(), format!("{CL}a{CL}b"));
        // Same content: nothing written.
        s.line.update(Some("b".into()), t0 + Duration::from_secs(5));
        assert_eq!(s.err(), format!("{CL}a{CL}b"));
        // Progress gone: the line goes.
        s.line.update(None, t0 + Duration::from_secs(6));
        assert_eq!(s.err(), format!("{CL}a{CL}b{CL}"));
    }

    #[test]
    fn no_progress_writes_nothing_to_stderr() {
        let t0 = Instant::now();
        let mut s = Screen::new(true);
        s.line.update(None, t0);
        s.line.log(b"plain\n", t0).unwrap();
        s.line.finish();
        assert_eq!(s.out(), "plain\n");
        assert_eq!(s.err(), "");
    }

    #[test]
    fn a_bar_on_its_own_terminal_stays_while_logs_go_elsewhere() {
        let t0 = Instant::now();
        let mut s = Screen::new(false);
        s.line.update(Some("bar".into()), t0);
        s.line.log(b"partial", t0).unwrap();
        s.line.log(b" line\n", t0).unwrap();
        assert_eq!(s.err(), format!("{CL}bar"));
        s.line.note("── attempt 2 ──", t0);
        assert_eq!(s.err(), format!("{CL}bar{CL}── attempt 2 ──\n{CL}bar"));
        s.line.finish();
        assert_eq!(s.err(), format!("{CL}bar{CL}── attempt 2 ──\n{CL}bar{CL}"));
        assert_eq!(s.out(), "partial line\n");
    }
}
