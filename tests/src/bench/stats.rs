//! Percentiles (nearest rank) over benchmark samples and the plain-text table the benchmark
//! prints. Invariant: a row's verdict compares the *median* with the target; p99 and the range
//! are shown for judgement only (the machine is shared and noisy).

use std::fmt::Write as _;
use std::time::Duration;

/// The nearest-rank `p`-th percentile (0 < p <= 100) of `samples`; `None` if there are none.
/// With few samples p99 is the largest one, which is what it should be.
pub fn percentile<T: Copy + PartialOrd>(samples: &[T], p: f64) -> Option<T> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Whether a row met its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A supporting figure without a target.
    Info,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Info => "info",
        }
    }
}

/// One line of the result table, already formatted.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub metric: String,
    pub samples: usize,
    pub median: String,
    pub p99: String,
    /// `min .. max` of the samples.
    pub range: String,
    pub target: String,
    pub verdict: Verdict,
}

/// Milliseconds, with two decimals below 10 ms (sub-millisecond figures need them).
pub fn ms(d: Duration) -> String {
    ms_f64(d.as_secs_f64() * 1000.0)
}

/// `ms` of a number of milliseconds (which may be negative: a difference).
pub fn ms_f64(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn rate(v: f64, unit: &str) -> String {
    format!("{v:.0} {unit}")
}

impl Row {
    /// Latencies; passes when the median is below `target` (`None`: informational).
    pub fn latency(metric: &str, samples: &[Duration], target: Option<Duration>) -> Row {
        let median = percentile(samples, 50.0).unwrap_or_default();
        let verdict = match target {
            None => Verdict::Info,
            Some(t) if median < t => Verdict::Pass,
            Some(_) => Verdict::Fail,
        };
        Row {
            metric: metric.into(),
            samples: samples.len(),
            median: ms(median),
            p99: ms(percentile(samples, 99.0).unwrap_or_default()),
            range: format!(
                "{} .. {}",
                ms(percentile(samples, 0.0).unwrap_or_default()),
                ms(percentile(samples, 100.0).unwrap_or_default())
            ),
            target: target.map_or("-".into(), |t| format!("p50 < {}", ms(t))),
            verdict,
        }
    }

    /// Rates (higher is better); passes when the median is above `target`.
    pub fn rate(metric: &str, samples: &[f64], unit: &str, target: Option<f64>) -> Row {
        let median = percentile(samples, 50.0).unwrap_or_default();
        let verdict = match target {
            None => Verdict::Info,
            Some(t) if median > t => Verdict::Pass,
            Some(_) => Verdict::Fail,
        };
        Row {
            metric: metric.into(),
            samples: samples.len(),
            median: rate(median, unit),
            p99: "-".into(),
            range: format!(
                "{} .. {}",
                rate(percentile(samples, 0.0).unwrap_or_default(), unit),
                rate(percentile(samples, 100.0).unwrap_or_default(), unit)
            ),
            target: target.map_or("-".into(), |t| format!("> {}", rate(t, unit))),
            verdict,
        }
    }

    /// A row for a measurement that could not be made (the caller prints why in a note).
    pub fn failed(metric: &str) -> Row {
        Row {
            metric: metric.into(),
            samples: 0,
            median: "ERROR".into(),
            p99: "-".into(),
            range: "-".into(),
            target: "-".into(),
            verdict: Verdict::Fail,
        }
    }
}

/// Renders rows as an aligned plain-text table with a header.
pub fn render(rows: &[Row]) -> String {
    let header = [
        "metric",
        "n",
        "median",
        "p99",
        "min .. max",
        "target",
        "result",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.clone(),
                r.samples.to_string(),
                r.median.clone(),
                r.p99.clone(),
                r.range.clone(),
                r.target.clone(),
                r.verdict.as_str().to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            // Numbers right-aligned, text left-aligned.
            if (1..=4).contains(&i) {
                let _ = write!(s, "{c:>w$}");
            } else {
                let _ = write!(s, "{c:<w$}");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &header.map(String::from));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&rule.join("-+-"));
    out.push('\n');
    for row in &cells {
        line(&mut out, row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7u8], 99.0), Some(7));
        assert_eq!(percentile::<u8>(&[], 50.0), None);
    }

    #[test]
    fn verdicts_compare_the_median() {
        let ms = Duration::from_millis;
        let fast = Row::latency("x", &[ms(10), ms(20), ms(500)], Some(ms(100)));
        assert_eq!(fast.verdict, Verdict::Pass);
        assert_eq!(fast.median, "20.0 ms");
        assert_eq!(fast.p99, "500.0 ms");
        let slow = Row::latency("x", &[ms(150), ms(200)], Some(ms(100)));
        assert_eq!(slow.verdict, Verdict::Fail);
        assert_eq!(Row::latency("x", &[ms(1)], None).verdict, Verdict::Info);
        assert_eq!(Row::latency("x", &[ms(1)], None).median, "1.00 ms");
        assert_eq!(
            Row::rate("r", &[90.0, 120.0, 130.0], "MB/s", Some(100.0)).verdict,
            Verdict::Pass
        );
        assert_eq!(
            Row::rate("r", &[90.0, 95.0, 130.0], "MB/s", Some(100.0)).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn table_is_aligned() {
        let rows = [
            Row::rate("placements", &[6000.0], "/s", Some(5000.0)),
            Row::failed("logs"),
        ];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("metric"));
        let bar = lines[0].find(" | ").unwrap();
        assert!(lines[2..].iter().all(|l| l.find(" | ") == Some(bar)));
        assert!(lines[2].ends_with("PASS") && lines[3].ends_with("FAIL"));
    }
}
