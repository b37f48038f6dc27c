//! Runyard's benchmark: real components in release mode, figures printed as one plain table.
//!
//! `cargo bench -p runyard-tests --bench bench [-- --quick] [latency] [logs] [placement]
//! [history] [services] [mlflow]` (no mode named: all but `services` and `mlflow`)
//!
//! - latency: submit-to-running of `print('hi')` through the HTTP API of an in-process
//!   `TestCluster` with one agent and a warm mirror, one job at a time; by the wall clock (POST to
//!   the GET that first shows `running`, polled every 2 ms) and by the job's own timestamps.
//! - logs: one job prints ~200 MB of numbered lines while a client follows its log over HTTP;
//!   MB/s from the first byte to the end; every line number is checked.
//! - placement: the pure `reconcile::reconcile` (and `scheduler::place` alone) over 1,000
//!   simulated agents and 10,000 pending jobs; then placements applied through each store
//!   (batched compare-and-swap writes) with 1,000 registered agents, on the embedded store and
//!   on a real etcd.
//! - history: a store holding 100,000 finished jobs; the controller is started on it in a child
//!   process (this binary with `--history-child DIR`): time until it answers a list request, its
//!   resident memory, and list-page latencies (first page, a deep page, a status filter).
//! - services (only when named: it installs uvicorn from PyPI and takes minutes): the data
//!   plane with real replicas: proxy overhead and requests/s against the direct path (direct
//!   and tunnel), batching gain, a load step to a second replica, failover (`services/mod.rs`).
//! - mlflow (only when named: it installs MLflow and scikit-learn from PyPI): one MLflow project
//!   to FINISHED with `mlflow run --env-manager uv` and with Runyard, interleaved
//!   (`mlflow/mod.rs`).
//!
//! Verdicts compare medians with targets. The machine is shared: the load average is printed
//! with the results, and a failed *measurement* (lost lines, a stuck job) exits non-zero.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use runyard_controller::logs::LogStore;
use runyard_controller::reconcile::{self, Action};
use runyard_controller::scheduler::{self, Placement};
use runyard_model::{Job, JobState, Timestamp};
use runyard_tests::bench::fleet;
use runyard_tests::bench::lines::{self, LineCheck};
use runyard_tests::bench::stats::{Row, Verdict, percentile, render};
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

mod mlflow;
mod services;

const LATENCY_TARGET: Duration = Duration::from_millis(25);
const LOG_TARGET_MB_S: f64 = 100.0;
const PLACEMENT_TARGET: f64 = 50_000.0;
const HISTORY_JOBS: usize = 100_000;
const HISTORY_RSS_TARGET_MB: f64 = 100.0;
const HISTORY_START_TARGET: Duration = Duration::from_secs(3);
const LIST_TARGET: Duration = Duration::from_millis(10);
/// Requests per list-latency figure and start-up.
const LIST_REQUESTS: usize = 100;
/// Pending jobs placed through a store per run (1,000 agents).
const APPLIED_JOBS: usize = 2_000;
/// Poll period of the wall-clock latency measurement.
const POLL: Duration = Duration::from_millis(2);
/// Bound on any one job of the benchmark.
const JOB_DEADLINE: Duration = Duration::from_secs(120);
/// Bound on one log-throughput run (200 MB at 1 MB/s would still finish).
const LOG_DEADLINE: Duration = Duration::from_secs(600);
const LOG_BYTES: u64 = 200_000_000;
const AGENTS: usize = 1_000;
const PENDING: usize = 10_000;
const AGENT_TTL: Duration = Duration::from_secs(30);
/// A job id of the controller's form, for the log store measured alone.
const BENCH_JOB: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";

/// What to run and how much of it.
struct Opts {
    latency: bool,
    logs: bool,
    placement: bool,
    history: bool,
    services: bool,
    mlflow: bool,
    latency_jobs: usize,
    log_runs: usize,
    placement_runs: usize,
    quick: bool,
}

impl Opts {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Opts> {
        let mut quick = false;
        let mut picked = Vec::new();
        for a in args {
            match a.as_str() {
                "--quick" => quick = true,
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "latency" | "logs" | "placement" | "history" | "services" | "mlflow" => {
                    picked.push(a)
                }
                other => bail!(
                    "unknown argument `{other}`; usage: bench [--quick] [latency] [logs] \
                     [placement] [history] [services] [mlflow]"
                ),
            }
        }
        let all = picked.is_empty();
        let on = |name: &str| all || picked.iter().any(|p| p == name);
        Ok(Opts {
            latency: on("latency"),
            logs: on("logs"),
            placement: on("placement"),
            history: on("history"),
            // Minutes long and needs PyPI: only when named.
            services: picked.iter().any(|p| p == "services"),
            mlflow: picked.iter().any(|p| p == "mlflow"),
            latency_jobs: if quick { 15 } else { 50 },
            log_runs: if quick { 1 } else { 3 },
            placement_runs: if quick { 3 } else { 10 },
            quick,
        })
    }
}

/// The benchmark's tokio runtime; `None` (and a message) if it cannot start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            None
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, dir] = args.as_slice()
        && flag == "--history-child"
    {
        return history_child(std::path::Path::new(dir));
    }
    let opts = match Opts::parse(args.into_iter()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Before the cluster's own (test-writer) subscriber: the code under test logs warnings only,
    // to stderr, so logging neither floods the table nor costs much.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();

    let load_start = load_average();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    if (opts.latency || opts.logs)
        && let Err(e) = rt.block_on(cluster_benches(&opts, &mut rows, &mut notes))
    {
        fail(&mut rows, &mut notes, "cluster benchmarks", e);
    }
    if opts.placement {
        placement(&opts, &mut rows, &mut notes);
    }
    if opts.placement {
        rt.block_on(applied_placement(&opts, &mut rows, &mut notes));
    }
    if opts.history
        && let Err(e) = rt.block_on(history(&opts, &mut rows, &mut notes))
    {
        fail(&mut rows, &mut notes, "history", e);
    }
    if opts.services
        && let Err(e) = rt.block_on(services::run(opts.quick, &mut rows, &mut notes))
    {
        fail(&mut rows, &mut notes, "services", e);
    }
    if opts.mlflow
        && let Err(e) = rt.block_on(mlflow::run(opts.quick, &mut rows, &mut notes))
    {
        fail(&mut rows, &mut notes, "mlflow", e);
    }

    println!();
    println!(
        "Runyard benchmark ({} mode, release build), {cores} cores",
        if opts.quick { "quick" } else { "full" }
    );
    println!(
        "Load average at start: {load_start}; at end: {} (this machine is shared and noisy: \
         compare runs, not single figures)",
        load_average()
    );
    println!();
    print!("{}", render(&rows));
    if !notes.is_empty() {
        println!();
        for n in &notes {
            println!("- {n}");
        }
    }
    println!("\n(took {:.0} s)", started.elapsed().as_secs_f64());
    if rows
        .iter()
        .any(|r| r.samples == 0 && r.verdict == Verdict::Fail)
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

// ---- cluster: latency and logs ----

async fn cluster_benches(
    opts: &Opts,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("hi.py", "print('hi')\n"), ("numbered.py", lines::SCRIPT)])?;
    let cluster = TestCluster::builder()
        .agent(AgentSpec::new("bench-agent"))
        .start()
        .await?;
    let result = async {
        // Warm caches: the agent's mirror of the repository, the interpreter, the page cache.
        for _ in 0..3 {
            let id = cluster
                .submit(json!({"repo": repo.url(), "script": "hi.py"}))
                .await?;
            wait_succeeded(&cluster, &id).await?;
        }
        if opts.latency {
            eprintln!("latency: {} jobs, one at a time", opts.latency_jobs);
            match latency(&cluster, &repo, opts.latency_jobs).await {
                Ok(s) => s.add_to(rows, notes),
                Err(e) => fail(rows, notes, "submit -> running", e),
            }
        }
        if opts.logs {
            eprintln!(
                "logs: {} run(s) of {} MB",
                opts.log_runs,
                LOG_BYTES / 1_000_000
            );
            match logs(&cluster, &repo, opts.log_runs).await {
                Ok(s) => s.add_to(rows, notes),
                Err(e) => fail(rows, notes, "log component figures", e),
            }
        }
        anyhow::Ok(())
    }
    .await;
    cluster.shutdown().await?;
    result
}

/// Records a measurement that could not be made: an ERROR row, and why in the notes.
fn fail(rows: &mut Vec<Row>, notes: &mut Vec<String>, metric: &str, e: anyhow::Error) {
    rows.push(Row::failed(metric));
    notes.push(format!("{metric}: ERROR: {e:#}"));
}

/// Rows plus notes of one benchmark section.
struct Section(Vec<Row>, Vec<String>);

impl Section {
    fn add_to(self, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
        rows.extend(self.0);
        notes.extend(self.1);
    }
}

async fn wait_succeeded(c: &TestCluster, id: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + JOB_DEADLINE;
    loop {
        let j = c.job(id).await?;
        match j["status"].as_str().unwrap_or("") {
            "succeeded" => return Ok(j),
            s @ ("failed" | "stopped") => bail!("job {id} {s}: {}", j["reason"]),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("job {id} not done after {JOB_DEADLINE:?}: {j}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn since(later: Option<Timestamp>, earlier: Option<Timestamp>) -> Option<Duration> {
    Some(later?.saturating_since(earlier?))
}

async fn latency(c: &TestCluster, repo: &GitRepo, n: usize) -> anyhow::Result<Section> {
    let spec = json!({"repo": repo.url(), "script": "hi.py"});
    let (mut wall, mut stamped, mut to_scheduled, mut to_started, mut to_done) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut unseen = 0;
    for i in 0..n {
        let t0 = Instant::now();
        let id = c.submit(spec.clone()).await?;
        loop {
            let j = c.job(&id).await?;
            match j["status"].as_str().unwrap_or("") {
                "running" => break,
                // Finished between two polls: the wall figure is an upper bound.
                "succeeded" => {
                    unseen += 1;
                    break;
                }
                s @ ("failed" | "stopped" | "lost") => bail!("job {id} {s}: {}", j["reason"]),
                _ => {}
            }
            if t0.elapsed() > JOB_DEADLINE {
                bail!("job {id} not running after {JOB_DEADLINE:?}: {j}");
            }
            tokio::time::sleep(POLL).await;
        }
        wall.push(t0.elapsed());
        let done = wait_succeeded(c, &id).await?;
        to_done.push(t0.elapsed());
        let job: Job = serde_json::from_value(done).context("job JSON")?;
        let created = Some(job.created_at);
        if let Some(d) = since(job.started_at, created) {
            stamped.push(d);
        }
        to_scheduled.extend(since(job.scheduled_at, created));
        to_started.extend(since(job.started_at, job.scheduled_at));
        if (i + 1) % 10 == 0 {
            eprintln!("  {}/{n}", i + 1);
        }
    }
    let mut notes = vec![format!(
        "latency: {n} jobs `print('hi')`, one agent, warm mirror; wall = POST until GET shows \
         `running` (polled every {} ms); timestamps have 1 ms resolution",
        POLL.as_millis()
    )];
    if unseen > 0 {
        notes.push(format!(
            "latency: {unseen} job(s) finished between two polls; their wall figure is the time \
             `succeeded` was seen"
        ));
    }
    if stamped.len() < n {
        notes.push(format!(
            "latency: {} job(s) have no started_at (the agent's `running` report was superseded)",
            n - stamped.len()
        ));
    }
    Ok(Section(
        vec![
            Row::latency(
                "submit -> running (wall clock)",
                &wall,
                Some(LATENCY_TARGET),
            ),
            Row::latency(
                "created_at -> started_at (job)",
                &stamped,
                Some(LATENCY_TARGET),
            ),
            Row::latency("  of which created -> scheduled", &to_scheduled, None),
            Row::latency("  of which scheduled -> started", &to_started, None),
            Row::latency("submit -> succeeded (wall clock)", &to_done, None),
        ],
        notes,
    ))
}

/// One log-throughput run.
struct LogRun {
    mb_s: f64,
    bytes: u64,
    /// Submit to the last byte.
    total: Duration,
    /// CPU used meanwhile by this process (controller, agent, follower) and by reaped children
    /// (the job's Python).
    cpu: CpuTime,
}

/// CPU seconds from `/proc/self/stat` (10 ms resolution).
#[derive(Clone, Copy, Debug, Default)]
struct CpuTime {
    own: f64,
    children: f64,
}

impl CpuTime {
    fn now() -> CpuTime {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14.
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|f| f.parse().unwrap_or(0.0))
                    .collect()
            })
            .unwrap_or_default();
        // /proc reports clock ticks of USER_HZ, which the kernel fixes at 100 on Linux.
        let hz = 100.0;
        let at = |i: usize| fields.get(i - 3).copied().unwrap_or(0.0) / hz;
        CpuTime {
            own: at(14) + at(15),
            children: at(16) + at(17),
        }
    }

    fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            own: self.own - earlier.own,
            children: self.children - earlier.children,
        }
    }
}

async fn logs(c: &TestCluster, repo: &GitRepo, runs: usize) -> anyhow::Result<Section> {
    let n_lines = lines::lines_for(LOG_BYTES);
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    let (mut rates, mut totals, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for run in 0..runs {
        let r = match log_run(c, repo, n_lines).await {
            Ok(r) => r,
            Err(e) => {
                // A wrong log is the finding; the component figures below still say where time
                // goes.
                fail(&mut rows, &mut notes, "log follow throughput", e);
                break;
            }
        };
        eprintln!(
            "  run {}: {:.0} MB/s ({} bytes, {:.1} s from submit; CPU {:.1} s in process, {:.1} s python)",
            run + 1,
            r.mb_s,
            r.bytes,
            r.total.as_secs_f64(),
            r.cpu.own,
            r.cpu.children,
        );
        bytes = r.bytes;
        rates.push(r.mb_s);
        totals.push(r.total);
        cpu.push(r.cpu);
    }
    if rates.len() == runs {
        rows.push(Row::rate(
            "log follow throughput (MB/s)",
            &rates,
            "MB/s",
            Some(LOG_TARGET_MB_S),
        ));
        rows.push(Row::latency(
            "  log job: submit -> last byte",
            &totals,
            None,
        ));
        notes.push(format!(
            "logs: {n_lines} numbered lines of {} bytes ({bytes} bytes) per run, every line \
             number checked; MB = 10^6 bytes; rate = bytes / (first byte .. end of stream)",
            lines::LINE_BYTES
        ));
        let median = |v: Vec<f64>| percentile(&v, 50.0).unwrap_or(0.0);
        notes.push(format!(
            "logs: CPU per run (median), submit to last byte: {:.1} s in this process \
             (controller + agent + follower), {:.1} s in the job's python, against {:.1} s of \
             wall clock on {} cores",
            median(cpu.iter().map(|c| c.own).collect()),
            median(cpu.iter().map(|c| c.children).collect()),
            median(totals.iter().map(Duration::as_secs_f64).collect()),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        ));
    }
    let producer = producer_alone(n_lines).await?;
    let store = store_alone(n_lines).await?;
    let disk = disk_alone(n_lines).await?;
    rows.push(Row::rate(
        "  python producer alone (pipe)",
        &[producer],
        "MB/s",
        None,
    ));
    rows.push(Row::rate(
        "  controller LogStore.append alone",
        &[store],
        "MB/s",
        None,
    ));
    rows.push(Row::rate(
        "  same appends, plain file, no fsync",
        &[disk],
        "MB/s",
        None,
    ));
    Ok(Section(rows, notes))
}

async fn log_run(c: &TestCluster, repo: &GitRepo, n_lines: u64) -> anyhow::Result<LogRun> {
    let t0 = Instant::now();
    let cpu0 = CpuTime::now();
    let id = c
        .submit(json!({
            "repo": repo.url(),
            "script": "numbered.py",
            "args": [n_lines.to_string()],
        }))
        .await?;
    // Its own client: the cluster's has a 2-minute whole-request timeout.
    let client = reqwest::Client::new();
    let mut resp = client
        .get(format!(
            "{}/api/v1/jobs/{id}/logs?follow=true",
            c.base_url()
        ))
        .bearer_auth(&c.token)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("follow returned {}", resp.status());
    }
    let mut check = LineCheck::new();
    let mut first = None;
    let deadline = t0 + LOG_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .with_context(|| format!("log of job {id} not complete after {LOG_DEADLINE:?}"))??;
        let Some(chunk) = chunk else { break };
        first.get_or_insert_with(Instant::now);
        check.feed(&chunk);
    }
    let end = Instant::now();
    let cpu = CpuTime::now().since(cpu0);
    if let Err(e) = check.finish(n_lines) {
        // Say where the loss is: in what the store holds, or only in the followed stream.
        let stored = match c.logs(&id).await {
            Ok(text) => {
                let mut again = LineCheck::new();
                again.feed(text.as_bytes());
                match again.finish(n_lines) {
                    Ok(()) => "complete, so the loss is in the follow stream".to_string(),
                    Err(e) => format!("also wrong ({e})"),
                }
            }
            Err(e) => format!("unreadable ({e:#})"),
        };
        bail!(
            "followed log of job {id} is wrong: {e}; the stored log (GET without follow) is {stored}"
        );
    }
    let job = c.job(&id).await?;
    if job["status"] != "succeeded" {
        bail!("log job {id} ended {}: {}", job["status"], job["reason"]);
    }
    let first = first.context("no log bytes")?;
    let secs = (end - first).as_secs_f64();
    Ok(LogRun {
        mb_s: check.bytes as f64 / 1e6 / secs,
        bytes: check.bytes,
        total: end - t0,
        cpu,
    })
}

/// The script's own rate into a pipe read and discarded: the ceiling of the log path.
async fn producer_alone(n_lines: u64) -> anyhow::Result<f64> {
    use tokio::io::AsyncReadExt;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", lines::SCRIPT, &n_lines.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("python3")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let mut first = None;
    loop {
        let n = out.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        bytes += n as u64;
    }
    let end = Instant::now();
    if !child.wait().await?.success() {
        bail!("the producer script failed");
    }
    let first = first.context("no output")?;
    Ok(bytes as f64 / 1e6 / (end - first).as_secs_f64())
}

/// One agent-sized chunk (lines joined by `\n`, no trailing one) and its line count. The
/// store only counts lines, so the same bytes serve every sequence number.
fn sample_chunk() -> (bytes::Bytes, u64) {
    let count = (1u64 << 20) / lines::LINE_BYTES as u64;
    let mut data: Vec<u8> = (0..count)
        .flat_map(|i| lines::line(i).into_bytes())
        .collect();
    data.pop();
    (data.into(), count)
}

/// The controller's persistence step alone: 1 MiB chunks, as the agent sends them, each
/// appended and fsynced by `LogStore::append`, into a temp dir on the same disk.
async fn store_alone(n_lines: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = LogStore::open(dir.path())?;
    let (chunk, per_chunk) = sample_chunk();
    let started = Instant::now();
    let mut seq = 0;
    while seq < n_lines {
        store
            .append(BENCH_JOB, 1, seq, per_chunk as u32, chunk.clone())
            .await?;
        seq += per_chunk;
    }
    let bytes = seq / per_chunk * (chunk.len() as u64 + 1);
    Ok(bytes as f64 / 1e6 / started.elapsed().as_secs_f64())
}

/// The disk without fsync: the same chunks appended to a plain file. Set against
/// `store_alone`, the difference is what the per-chunk fsync costs.
async fn disk_alone(n_lines: u64) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let dir = tempfile::tempdir()?;
        let mut f = std::fs::File::create(dir.path().join("plain.log"))?;
        let (chunk, per_chunk) = sample_chunk();
        let started = Instant::now();
        let mut seq = 0;
        while seq < n_lines {
            f.write_all(&chunk)?;
            f.write_all(b"\n")?;
            seq += per_chunk;
        }
        let bytes = seq / per_chunk * (chunk.len() as u64 + 1);
        Ok(bytes as f64 / 1e6 / started.elapsed().as_secs_f64())
    })
    .await?
}

// ---- placement ----

fn placement(opts: &Opts, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    eprintln!(
        "placement: {} runs, {AGENTS} agents, {PENDING} pending jobs",
        opts.placement_runs
    );
    let agents = fleet::agents(AGENTS);
    let jobs = fleet::pending_jobs(PENDING);
    let refs: Vec<&JobState> = jobs.iter().collect();
    let expected = fleet::placeable(AGENTS, PENDING);
    let now = Timestamp(10_000_000);

    let (mut pass_rates, mut pass_times) = (Vec::new(), Vec::new());
    for _ in 0..opts.placement_runs {
        let t = Instant::now();
        let plan = black_box(reconcile::reconcile(
            black_box(&refs),
            black_box(&agents),
            now,
            AGENT_TTL,
        ));
        let took = t.elapsed();
        let placed = plan
            .iter()
            .filter(|a| matches!(a, Action::Place { .. }))
            .count();
        if placed != expected {
            let e = anyhow::anyhow!("placed {placed} jobs, expected {expected}");
            return fail(rows, notes, "reconcile placements/s", e);
        }
        pass_rates.push(placed as f64 / took.as_secs_f64());
        pass_times.push(took);
    }

    let (mut place_rates, mut place_times) = (Vec::new(), Vec::new());
    for _ in 0..opts.placement_runs {
        let mut capacity = fleet::capacities(&agents);
        let t = Instant::now();
        let placed = jobs
            .iter()
            .filter(|j| {
                matches!(
                    scheduler::place(black_box(j.intent.spec.compute), &mut capacity),
                    Placement::Placed { .. }
                )
            })
            .count();
        let took = t.elapsed();
        if placed != expected {
            let e = anyhow::anyhow!("placed {placed} jobs, expected {expected}");
            return fail(rows, notes, "scheduler::place placements/s", e);
        }
        place_rates.push(placed as f64 / took.as_secs_f64());
        place_times.push(took);
    }
    rows.push(Row::rate(
        "reconcile placements/s",
        &pass_rates,
        "/s",
        Some(PLACEMENT_TARGET),
    ));
    rows.push(Row::latency("  one reconcile pass", &pass_times, None));
    rows.push(Row::rate(
        "scheduler::place placements/s",
        &place_rates,
        "/s",
        Some(PLACEMENT_TARGET),
    ));
    rows.push(Row::latency(
        "  place() over the backlog",
        &place_times,
        None,
    ));
    let per_job = percentile(&place_times, 50.0).unwrap_or_default() / PENDING as u32;
    notes.push(format!(
        "placement: {AGENTS} agents ({} CPU hosts with 8 cpu-small slots, {} GPU hosts with 8 \
         GPUs and 8 slots), {PENDING} pending jobs (7/10 cpu-small, 2/10 gpu, 1/10 gpu:4); \
         {expected} fit, the rest wait (their wait reason is computed too); \
         median {:.1} us per job in place()",
        AGENTS - AGENTS / 2,
        AGENTS / 2,
        per_job.as_secs_f64() * 1e6
    ));
}

// ---- placement through a store ----

/// Placements applied through each store: the plan of `reconcile_once` written job by job.
async fn applied_placement(opts: &Opts, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let runs = if opts.quick { 1 } else { 3 };
    for kind in ["file", "etcd"] {
        eprintln!("placement through the {kind} store: {runs} run(s) of {APPLIED_JOBS} jobs");
        let mut rates = Vec::new();
        for _ in 0..runs {
            match applied_run(kind).await {
                Ok(rate) => rates.push(rate),
                Err(e) => {
                    return fail(rows, notes, &format!("placements/s applied ({kind})"), e);
                }
            }
        }
        rows.push(Row::rate(
            &format!("placements/s applied, {kind} store"),
            &rates,
            "/s",
            None,
        ));
    }
    notes.push(format!(
        "placements applied: {APPLIED_JOBS} pending jobs onto 1,000 registered agents through \
         `Controller::reconcile_once`, from the first pass to the last placement stored; \
         placements are written as compare-and-swap batches (one redb transaction of up to \
         10,000 writes, etcd transactions of up to 128), each job re-tried alone on a conflict"
    ));
}

async fn applied_run(kind: &str) -> anyhow::Result<f64> {
    use runyard_controller::agents::Agents;
    use runyard_controller::artifacts::DirStore;
    use runyard_controller::jobs::Jobs;
    use runyard_controller::store::{self, Precondition, Store};
    use runyard_model::{AgentInfo, JobStatus};

    let dir = tempfile::tempdir()?;
    let etcd = match kind {
        "etcd" => Some(runyard_tests::etcd::EtcdServer::start().await?),
        _ => None,
    };
    let url = etcd.as_ref().map_or("file:".to_string(), |e| e.url());
    let store: std::sync::Arc<dyn Store> = store::open(&url, dir.path()).await?;
    let jobs = fleet::pending_jobs(APPLIED_JOBS);
    let mut writes = futures::stream::iter(jobs.iter().map(|j| {
        let store = store.clone();
        let value = serde_json::to_vec(&j.intent).expect("an intent serializes");
        let key = runyard_controller::jobs::intent_key(j.id());
        async move { store.put(&key, value, Precondition::Absent).await }
    }))
    .buffer_unordered(64);
    while let Some(r) = writes.next().await {
        r?;
    }
    let table = Jobs::load(store.clone()).await?;
    let agents = Agents::load(store.clone(), Timestamp::now()).await?;
    let mut sessions = Vec::new();
    for a in fleet::agents(AGENTS) {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        sessions.push(rx);
        let info = AgentInfo {
            name: a.name.clone(),
            connected: true,
            cpu_small_slots: a.cpu_small_slots,
            gpus: a
                .gpus
                .iter()
                .map(|&index| runyard_model::GpuInfo {
                    index,
                    uuid: format!("GPU-{index}"),
                    name: "bench".into(),
                    memory_total_bytes: 80 << 30,
                    memory_used_bytes: 0,
                    utilization_percent: 0,
                })
                .collect(),
            cpus: 8,
            memory_bytes: 1 << 34,
            version: "bench".into(),
            last_seen: Timestamp::now(),
            jobs: Vec::new(),
        };
        let (_turn, claim) = agents.claim(&info.name);
        agents.connect(info, tx, claim).await;
    }
    let ctl = runyard_controller::Controller::new(
        table.clone(),
        agents,
        LogStore::open(dir.path().join("logs"))?,
        LogStore::open(dir.path().join("reports"))?,
        std::sync::Arc::new(DirStore::open(dir.path().join("artifacts"))?),
        AGENT_TTL,
    );
    let expected = fleet::placeable(AGENTS, APPLIED_JOBS);
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    loop {
        ctl.reconcile_once().await;
        let placed = table
            .active()
            .iter()
            .filter(|j| j.status == JobStatus::Scheduled)
            .count();
        if placed >= expected {
            return Ok(placed as f64 / t.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("placed {placed} of {expected} jobs within 600 s");
        }
    }
}

// ---- history ----

/// The child process of the history case: a controller on `dir` and nothing else; prints its
/// HTTP address on the first line of stdout.
fn history_child(dir: &std::path::Path) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("http {}", http.local_addr()?);
        let config = runyard_controller::Config::new(dir);
        runyard_controller::run(
            config,
            http,
            grpc,
            tokio_util::sync::CancellationToken::new(),
        )
        .await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("history child: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

async fn history(opts: &Opts, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> anyhow::Result<()> {
    use runyard_tests::bench::history::{finished_job, job_id};
    use std::io::BufRead as _;

    let n = if opts.quick {
        HISTORY_JOBS / 5
    } else {
        HISTORY_JOBS
    };
    let runs = if opts.quick { 1 } else { 3 };
    eprintln!("history: {n} finished jobs, {runs} controller start(s)");
    let dir = tempfile::tempdir()?;
    let mut bytes = 0usize;
    {
        let path = dir
            .path()
            .join(runyard_controller::store::DEFAULT_FILE_NAME);
        let store = runyard_controller::store::FileStore::open(&path).await?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            let batch: Vec<_> = chunk.iter().flat_map(|&i| finished_job(i)).collect();
            bytes += batch.iter().map(|(_, v)| v.len()).sum::<usize>();
            store.put_many(batch).await?;
        }
    }
    let middle = job_id(n / 2);
    let http = reqwest::Client::new();
    let (mut starts, mut rss_start, mut rss_after) = (Vec::new(), Vec::new(), Vec::new());
    let (mut first, mut deep, mut filtered) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("--history-child")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let result = async {
            let stdout = child.stdout.take().context("child stdout")?;
            let line = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufReader::new(stdout)
                    .read_line(&mut line)
                    .map(|_| line)
            })
            .await??;
            let addr = line
                .trim()
                .strip_prefix("http ")
                .context("child address")?
                .to_string();
            let base = format!("http://{addr}");
            let deadline = Instant::now() + Duration::from_secs(120);
            let token = loop {
                if let Ok(t) = std::fs::read_to_string(dir.path().join("admin.token")) {
                    break t.trim().to_string();
                }
                if Instant::now() > deadline {
                    bail!("no admin token");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let get = |path: String| {
                let req = http.get(format!("{base}{path}")).bearer_auth(&token);
                async move {
                    let resp = req.send().await?;
                    let status = resp.status();
                    let body: Value = resp.json().await?;
                    anyhow::Ok((status, body))
                }
            };
            loop {
                if let Ok((status, body)) = get("/api/v1/jobs?limit=50".into()).await
                    && status.is_success()
                {
                    let listed = body["jobs"].as_array().map_or(0, Vec::len);
                    if listed != 50 {
                        bail!("the first page lists {listed} jobs, not 50");
                    }
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the controller did not answer within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            starts.push(t.elapsed());
            rss_start.push(rss_mb(pid)?);
            for (path, out) in [
                ("/api/v1/jobs?limit=50".to_string(), &mut first),
                (format!("/api/v1/jobs?limit=50&cursor={middle}"), &mut deep),
                (
                    "/api/v1/jobs?limit=50&status=failed".to_string(),
                    &mut filtered,
                ),
            ] {
                for _ in 0..LIST_REQUESTS {
                    let t = Instant::now();
                    let (status, body) = get(path.clone()).await?;
                    out.push(t.elapsed());
                    if !status.is_success() || body["jobs"].as_array().map_or(0, Vec::len) != 50 {
                        bail!("{path}: {status}");
                    }
                }
            }
            rss_after.push(rss_mb(pid)?);
            anyhow::Ok(())
        }
        .await;
        let _ = child.kill();
        let _ = child.wait();
        result?;
    }
    rows.push(Row::latency(
        &format!("controller start, {}k finished jobs", n / 1000),
        &starts,
        Some(HISTORY_START_TARGET),
    ));
    let mb_target = |samples: &[f64]| {
        let mut r = Row::rate("", samples, "MB", None);
        let median = percentile(samples, 50.0).unwrap_or_default();
        r.target = format!("<= {HISTORY_RSS_TARGET_MB:.0} MB");
        r.verdict = if median <= HISTORY_RSS_TARGET_MB {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        r
    };
    let mut r = mb_target(&rss_start);
    r.metric = "  controller RSS after start".into();
    rows.push(r);
    let mut r = mb_target(&rss_after);
    r.metric = "  controller RSS after 300 list requests".into();
    rows.push(r);
    rows.push(Row::latency(
        "GET /jobs?limit=50 (newest)",
        &first,
        Some(LIST_TARGET),
    ));
    rows.push(Row::latency(
        "GET /jobs?limit=50 (deep cursor)",
        &deep,
        Some(LIST_TARGET),
    ));
    rows.push(Row::latency(
        "GET /jobs?limit=50&status=failed",
        &filtered,
        Some(LIST_TARGET),
    ));
    notes.push(format!(
        "history: {n} finished jobs ({:.0} MB of JSON records, a tenth with a 46-package \
         environment) in the embedded store; start = process spawn to the first answered \
         list request; RSS from /proc/PID/status",
        bytes as f64 / 1e6
    ));
    Ok(())
}
