//! An HTTP load generator for the services benchmark: `N` concurrent tasks on pooled keep-alive
//! connections (reqwest), each sending its next request when the last one's body has been read,
//! for a count or a duration. It runs on a runtime of its own (`LoadGen`), so the CPU time of its
//! threads can be told apart from the controller's in the same process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// What one request is.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    /// Sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// A POST with this JSON body (the task's request number is appended as `"n"`), else a GET.
    pub post_json: Option<serde_json::Value>,
}

impl Target {
    pub fn get(url: impl Into<String>, token: Option<&str>) -> Target {
        Target {
            url: url.into(),
            token: token.map(str::to_string),
            post_json: None,
        }
    }

    pub fn post(url: impl Into<String>, token: Option<&str>, body: serde_json::Value) -> Target {
        Target {
            post_json: Some(body),
            ..Target::get(url, token)
        }
    }
}

/// One finished request.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// When the answer's last byte came.
    pub end: Instant,
    pub latency: Duration,
    pub ok: bool,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    /// From the first request sent to the last answer read.
    pub elapsed: Duration,
    /// The first few failures (status and body, or the error).
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> usize {
        self.samples.iter().filter(|s| s.ok).count()
    }

    pub fn failed(&self) -> usize {
        self.samples.len() - self.ok()
    }

    /// Successful requests per second.
    pub fn rate(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latencies of successful requests.
    pub fn latencies(&self) -> Vec<Duration> {
        self.samples
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.latency)
            .collect()
    }
}

/// When a run ends.
#[derive(Clone, Debug)]
pub enum Until {
    /// This many requests in all.
    Count(u64),
    /// This long after the start.
    For(Duration),
    /// Until the flag is set, or the deadline (a bound).
    Stopped(Arc<AtomicBool>, Duration),
}

/// Called with every successful answer's body (to tag answers by who sent them).
pub type Inspect = Arc<dyn Fn(&Bytes) + Send + Sync>;

/// A client whose connections stay open between requests (up to 256 per host).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a plain HTTP client builds")
}

/// The load generator's own runtime and the ids of its threads.
pub struct LoadGen {
    rt: Option<tokio::runtime::Runtime>,
    threads: Arc<Mutex<Vec<String>>>,
}

impl LoadGen {
    /// A runtime of `threads` worker threads.
    pub fn new(threads: usize) -> std::io::Result<LoadGen> {
        let ids = Arc::new(Mutex::new(Vec::new()));
        let seen = ids.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("load-gen")
            .on_thread_start(move || {
                // `/proc/thread-self` is `PID/task/TID`.
                if let Ok(p) = std::fs::read_link("/proc/thread-self") {
                    seen.lock()
                        .unwrap()
                        .push(format!("/proc/{}/stat", p.display()));
                }
            })
            .enable_all()
            .build()?;
        Ok(LoadGen {
            rt: Some(rt),
            threads: ids,
        })
    }

    /// CPU seconds its threads have used so far.
    pub fn cpu(&self) -> f64 {
        self.threads
            .lock()
            .unwrap()
            .iter()
            .map(|p| stat_cpu(p).unwrap_or(0.0))
            .sum()
    }

    /// Runs `concurrency` clients against `target` on this runtime until `until`.
    pub async fn run(
        &self,
        client: &reqwest::Client,
        target: &Target,
        concurrency: usize,
        until: Until,
        inspect: Option<Inspect>,
    ) -> Report {
        let rt = self.rt.as_ref().expect("running");
        let handle = rt.spawn(run(
            client.clone(),
            target.clone(),
            concurrency,
            until,
            inspect,
        ));
        handle.await.unwrap_or_default()
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's context must not block.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// utime + stime, in seconds, of a `/proc/.../stat` file (USER_HZ is 100 on Linux).
pub fn stat_cpu(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    Some((ticks(14)? + ticks(15)?) / 100.0)
}

/// The run itself, on whatever runtime polls it.
pub async fn run(
    client: reqwest::Client,
    target: Target,
    concurrency: usize,
    until: Until,
    inspect: Option<Inspect>,
) -> Report {
    let start = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let numbered = Arc::new(AtomicU64::new(0));
    let tasks = (0..concurrency).map(|_| {
        let (client, target, until, issued, numbered, inspect) = (
            client.clone(),
            target.clone(),
            until.clone(),
            issued.clone(),
            numbered.clone(),
            inspect.clone(),
        );
        async move {
            let mut samples = Vec::new();
            let mut failures = Vec::new();
            loop {
                let go = match &until {
                    Until::Count(n) => issued.fetch_add(1, Ordering::Relaxed) < *n,
                    Until::For(d) => start.elapsed() < *d,
                    Until::Stopped(stop, bound) => {
                        !stop.load(Ordering::SeqCst) && start.elapsed() < *bound
                    }
                };
                if !go {
                    break;
                }
                let mut req = match &target.post_json {
                    Some(body) => {
                        let n = numbered.fetch_add(1, Ordering::Relaxed);
                        client
                            .post(&target.url)
                            .json(&serde_json::json!({"n": n, "body": body}))
                    }
                    None => client.get(&target.url),
                };
                if let Some(t) = &target.token {
                    req = req.bearer_auth(t);
                }
                let t = Instant::now();
                let outcome = match req.send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.bytes().await {
                            Ok(body) if status.is_success() => {
                                if let Some(f) = &inspect {
                                    f(&body);
                                }
                                Ok(())
                            }
                            Ok(body) => Err(format!(
                                "{status}: {}",
                                String::from_utf8_lossy(&body[..body.len().min(300)])
                            )),
                            Err(e) => Err(format!("{status}, body: {e}")),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                let end = Instant::now();
                if let Err(why) = &outcome
                    && failures.len() < 5
                {
                    failures.push(why.clone());
                }
                samples.push(Sample {
                    end,
                    latency: end - t,
                    ok: outcome.is_ok(),
                });
            }
            (samples, failures)
        }
    });
    let results = futures::future::join_all(tasks).await;
    let mut report = Report {
        elapsed: start.elapsed(),
        ..Report::default()
    };
    for (s, f) in results {
        report.samples.extend(s);
        if report.failures.len() < 5 {
            report.failures.extend(f);
        }
    }
    report.samples.sort_by_key(|s| s.end);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_reads_utime_and_stime_after_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stat");
        // comm with a space and a parenthesis; utime 250 and stime 50 ticks.
        let fields: Vec<String> = (4..=20)
            .map(|i| match i {
                14 => "250".into(),
                15 => "50".into(),
                _ => "0".into(),
            })
            .collect();
        std::fs::write(&p, format!("42 (a b) c) S {}\n", fields.join(" "))).unwrap();
        assert_eq!(stat_cpu(p.to_str().unwrap()), Some(3.0));
        assert!(stat_cpu("/proc/self/stat").is_some());
    }

    #[test]
    fn a_report_counts_successes_and_rates() {
        let now = Instant::now();
        let s = |ok| Sample {
            end: now,
            latency: Duration::from_millis(2),
            ok,
        };
        let r = Report {
            samples: vec![s(true), s(true), s(false)],
            elapsed: Duration::from_secs(2),
            failures: vec![],
        };
        assert_eq!((r.ok(), r.failed()), (2, 1));
        assert_eq!(r.rate(), 1.0);
        assert_eq!(r.latencies().len(), 2);
    }
}
