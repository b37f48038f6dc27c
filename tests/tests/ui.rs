//! The web page in a real headless Chromium against a real controller and agent (TestCluster):
//! sign-in, the new-run form with its validation errors, live logs, stop, run again, runs and
//! agents pages, a narrow (phone) viewport, the bounded log window and search, logs across a
//! controller restart, a Lightning run's progress, metric plot and checkpoint download, and the
//! services view (list, service page, scale, stop, a service opened by its link).
//! Screenshots of each page are written under `target/ui-screenshots/` (printed in the output).

use std::time::Duration;

use runyard_tests::browser::Browser;
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use runyard_tests::scripts::LIGHTNING_TRAIN;
use runyard_tests::services::{SERVER_PY, ready, wait_service};
use serde_json::{Value, json};

/// Prints `tick N` every `delay` seconds, `count` times.
const TICKER: &str = r#"
import sys, time
count, delay = int(sys.argv[1]), float(sys.argv[2])
for i in range(count):
    print(f"tick {i}", flush=True)
    time.sleep(delay)
"#;

/// Prints `count` numbered lines as fast as it can.
const BURST: &str = r#"
import sys
for i in range(int(sys.argv[1])):
    print(f"line {i:05d}")
"#;

const LONG: Duration = Duration::from_secs(60);

/// Waits until the runs table shows `n` rows.
async fn wait_rows(b: &Browser, n: u64) -> anyhow::Result<()> {
    b.wait_until(&format!("{n} rows in the runs table"), LONG, || async {
        let rows = b
            .js(
                "return document.querySelectorAll('#runs-body tr').length;",
                vec![],
            )
            .await
            .ok()?;
        (rows == n).then_some(())
    })
    .await
}

async fn sign_in(b: &Browser, c: &TestCluster) -> anyhow::Result<()> {
    b.goto(&format!("{}/", c.base_url())).await?;
    b.wait_for("#signin").await?;
    b.fill("#token", &c.token).await?;
    b.click("#signin-submit").await?;
    b.wait_for("#runs").await
}

/// The lines of the log pane as rendered (separators and the partial line left out).
async fn log_lines(b: &Browser) -> anyhow::Result<Vec<String>> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#log .l:not(.sep):not(.partial)')].map(e => e.textContent);",
            vec![],
        )
        .await?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default())
}

async fn log_total(b: &Browser) -> anyhow::Result<u64> {
    let v = b
        .js(
            "const e = document.getElementById('log'); return e ? Number(e.dataset.total) : -1;",
            vec![],
        )
        .await?;
    Ok(v.as_i64().unwrap_or(-1).max(0) as u64)
}

/// The id of the run whose page the browser opened (after a submit from the form).
async fn run_page_id(b: &Browser) -> anyhow::Result<String> {
    let hash = b
        .wait_until("the run page", LONG, || async {
            b.hash().await.ok().filter(|h| h.starts_with("#/runs/"))
        })
        .await?;
    Ok(hash.trim_start_matches("#/runs/").to_string())
}

async fn job_status(c: &TestCluster, id: &str) -> anyhow::Result<String> {
    Ok(c.job(id).await?["status"]
        .as_str()
        .unwrap_or("")
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_submit_follow_stop_and_field_errors() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("ticker.py", TICKER)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let b = Browser::start("main").await?;
    let base = c.base_url();

    // Nothing without the token: the shell only shows the sign-in form.
    b.goto(&format!("{base}/")).await?;
    b.wait_for("#signin").await?;
    assert_eq!(b.text("#runs").await?, None);
    assert_eq!(
        b.js("return document.getElementById('nav').hidden;", vec![])
            .await?,
        true
    );
    b.fill("#token", "rya_not-the-token").await?;
    b.click("#signin-submit").await?;
    b.wait_text("#signin-error", LONG, |t| t.contains("not valid"))
        .await?;
    b.screenshot("01-sign-in").await?;
    b.fill("#token", &c.token).await?;
    b.click("#signin-submit").await?;
    b.wait_for("#runs").await?;
    b.wait_for("#runs-empty").await?;

    // A bad field: the API's message next to that field, and no job created.
    b.click("#new-run").await?;
    b.wait_for("#new-run").await?;
    b.fill("#f-repo", "ftp://example.invalid/repo.git").await?;
    b.fill("#f-script", "ticker.py").await?;
    b.click("#submit-run").await?;
    let err = b.wait_text("#err-repo", LONG, |t| !t.is_empty()).await?;
    assert!(err.contains("unsupported scheme `ftp`"), "{err}");
    assert_eq!(b.text("#err-script").await?.as_deref(), Some(""));
    let invalid = b
        .js(
            "return document.querySelector('.field[data-field=repo]').classList.contains('invalid');",
            vec![],
        )
        .await?;
    assert_eq!(invalid, true);
    b.screenshot("02-new-run-field-error").await?;
    // A nested field (`env.FOO`) is shown next to its base field.
    b.fill("#f-repo", &repo.url()).await?;
    b.fill("#f-env", "RUNYARD_X=1").await?;
    b.click("#submit-run").await?;
    let err = b.wait_text("#err-env", LONG, |t| !t.is_empty()).await?;
    assert!(err.contains("RUNYARD_X"), "{err}");
    assert_eq!(b.text("#err-repo").await?.as_deref(), Some(""));
    assert_eq!(
        c.get("/api/v1/jobs").await?["jobs"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "a rejected spec creates no job"
    );

    // Submit a valid run from the form; its page follows the log live.
    b.fill("#f-env", "GREETING=hi there").await?;
    b.fill("#f-args", "100000\n0.05").await?;
    b.fill("#f-name", "ticker from the browser").await?;
    b.click("#submit-run").await?;
    let id = run_page_id(&b).await?;
    let job = c.job(&id).await?;
    assert_eq!(job["spec"]["args"], json!(["100000", "0.05"]), "{job}");
    assert_eq!(job["spec"]["env"], json!({"GREETING": "hi there"}));
    assert_eq!(job["name"], "ticker from the browser");
    b.wait_text("#run-status", LONG, |t| t == "running").await?;
    b.wait_until("log lines to arrive", LONG, || async {
        let lines = log_lines(&b).await.ok()?;
        (lines.len() >= 10).then_some(())
    })
    .await?;
    let lines = log_lines(&b).await?;
    let ticks: Vec<&String> = lines.iter().filter(|l| l.starts_with("tick ")).collect();
    for (i, l) in ticks.iter().enumerate() {
        assert_eq!(**l, format!("tick {i}"), "lines in order, none missing");
    }
    // And it keeps following.
    let seen = ticks.len();
    b.wait_until("more log lines", LONG, || async {
        let n = log_lines(&b).await.ok()?.len();
        (n > lines.len() + 5).then_some(())
    })
    .await?;
    assert!(
        b.text("#run-commit").await?.is_some_and(|t| t.len() == 8),
        "the resolved commit is shown"
    );
    b.screenshot("03-run-live-log").await?;

    // Stop from the page.
    b.click("#stop").await?;
    b.wait_text("#run-status", LONG, |t| t == "stopped").await?;
    let reason = b.wait_text("#run-reason", LONG, |t| !t.is_empty()).await?;
    assert!(reason.to_lowercase().contains("stop"), "{reason}");
    assert_eq!(job_status(&c, &id).await?, "stopped");
    let full = c.logs(&id).await?;
    let full = full.trim_end_matches('\n');
    let shown = b
        .wait_until("the whole log on the page", LONG, || async {
            let shown = log_lines(&b).await.ok()?.join("\n");
            (shown == full).then_some(shown)
        })
        .await;
    assert!(
        shown.is_ok(),
        "the page shows exactly the stored log (after {seen} ticks): {:?}",
        log_lines(&b).await?
    );
    b.screenshot("04-run-stopped").await?;

    // Run again: the form comes prefilled from the spec.
    b.click("#run-again").await?;
    b.wait_text("h1", LONG, |t| t == "Run again").await?;
    b.wait_until("prefilled repo", LONG, || async {
        let v = b
            .js("return document.getElementById('f-repo').value;", vec![])
            .await
            .ok()?;
        (v == repo.url().as_str()).then_some(())
    })
    .await?;
    let args = b
        .js("return document.getElementById('f-args').value;", vec![])
        .await?;
    assert_eq!(args, "100000\n0.05");
    let env = b
        .js("return document.getElementById('f-env').value;", vec![])
        .await?;
    assert_eq!(env, "GREETING=hi there");
    b.screenshot("05-run-again-form").await?;

    // Runs table and agents page.
    b.goto(&format!("{base}/#/runs")).await?;
    let row = format!("#runs-body tr[data-id='{id}'] .status");
    b.wait_text(&row, LONG, |t| t == "stopped").await?;
    let more_visible = b
        .js(
            "return document.getElementById('load-more').offsetParent !== null;",
            vec![],
        )
        .await?;
    assert_eq!(more_visible, false, "one page of runs: no \"load more\"");
    b.screenshot("06-runs").await?;
    b.goto(&format!("{base}/#/agents")).await?;
    let agent = b
        .wait_text("#agents-body tr[data-agent='a1']", LONG, |t| {
            t.contains("connected")
        })
        .await?;
    assert!(agent.contains("cpu-small ×4"), "{agent}");
    b.screenshot("07-agents").await?;

    // A phone-sized viewport: nothing wider than the screen, tables scroll in their box.
    b.client.set_window_size(390, 844).await?;
    for (page, name) in [
        ("#/runs".to_string(), "08-runs-narrow"),
        (format!("#/runs/{id}"), "09-run-narrow"),
        ("#/new".to_string(), "10-new-run-narrow"),
    ] {
        b.goto(&format!("{base}/{page}")).await?;
        b.wait_for("main h1").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let overflow = b
            .js(
                "return document.documentElement.scrollWidth - window.innerWidth;",
                vec![],
            )
            .await?;
        assert!(
            overflow.as_i64().unwrap_or(99) <= 0,
            "{page} is wider than a phone screen by {overflow} px"
        );
        b.screenshot(name).await?;
    }

    // Signing out hides everything again.
    b.client.set_window_size(1280, 900).await?;
    b.click("#sign-out").await?;
    b.wait_for("#signin").await?;
    assert_eq!(b.text("#runs").await?, None);
    b.close().await?;
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_window_is_bounded_and_survives_a_controller_restart() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("burst.py", BURST), ("ticker.py", TICKER)])?;
    let mut c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let b = Browser::start("logs").await?;
    sign_in(&b, &c).await?;

    // 20,000 lines at once: all counted, the last 5,000 in the DOM, search over all of them.
    let id = c
        .submit(json!({"repo": repo.url(), "script": "burst.py", "args": ["20000"]}))
        .await?;
    c.wait_status(&id, &["succeeded"], LONG).await?;
    b.goto(&format!("{}/#/runs/{id}", c.base_url())).await?;
    b.wait_until("20000 lines counted", LONG, || async {
        (log_total(&b).await.ok()? == 20000).then_some(())
    })
    .await?;
    let lines = log_lines(&b).await?;
    assert_eq!(lines.len(), 5000);
    assert_eq!(lines.first().map(String::as_str), Some("line 15000"));
    assert_eq!(lines.last().map(String::as_str), Some("line 19999"));
    let dropped = b.wait_text("#log-dropped", LONG, |t| !t.is_empty()).await?;
    assert!(dropped.contains("15000 earlier lines"), "{dropped}");
    b.screenshot("11-log-window").await?;
    b.fill("#log-search", "line 0123").await?;
    b.wait_text("#log-info", LONG, |t| t.starts_with("10 matching"))
        .await?;
    let found = log_lines(&b).await?;
    assert_eq!(found.len(), 10, "line 01230 .. line 01239: {found:?}");
    assert!(found.iter().all(|l| l.starts_with("line 0123")));
    let marks = b
        .js(
            "return document.querySelectorAll('#log mark').length;",
            vec![],
        )
        .await?;
    assert_eq!(marks, 10);
    b.screenshot("12-log-search").await?;
    b.fill("#log-search", "").await?;
    b.wait_text("#log-info", LONG, |t| t == "20000 lines")
        .await?;

    // A slow run followed across a controller restart: every line once, in order.
    let id = c
        .submit(json!({"repo": repo.url(), "script": "ticker.py", "args": ["120", "0.05"]}))
        .await?;
    b.goto(&format!("{}/#/runs/{id}", c.base_url())).await?;
    b.wait_until("the first lines", LONG, || async {
        (log_total(&b).await.ok()? >= 10).then_some(())
    })
    .await?;
    c.restart_controller().await?;
    b.wait_text("#run-status", LONG, |t| t == "succeeded")
        .await?;
    b.wait_until("all 120 lines", LONG, || async {
        (log_total(&b).await.ok()? >= 120).then_some(())
    })
    .await?;
    // Nothing more arrives late.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shown = log_lines(&b).await?;
    let want: Vec<String> = (0..120).map(|i| format!("tick {i}")).collect();
    let ticks: Vec<String> = shown
        .iter()
        .filter(|l| l.starts_with("tick "))
        .cloned()
        .collect();
    assert_eq!(ticks, want);
    assert_eq!(
        shown.join("\n"),
        c.logs(&id).await?.trim_end_matches('\n'),
        "the page's log equals the stored log"
    );
    b.wait_until("the reconnect notice to clear", LONG, || async {
        let v = b
            .js("return document.getElementById('conn').hidden;", vec![])
            .await
            .ok()?;
        (v == true).then_some(())
    })
    .await?;
    b.screenshot("13-log-after-restart").await?;

    // Pagination: GPU jobs stay pending on this CPU-only cluster; 50 a page, then "load more".
    for i in 0..52 {
        c.submit(json!({"repo": repo.url(), "script": "ticker.py", "name": format!("queued {i:02}"), "compute": "gpu"}))
            .await?;
    }
    b.goto(&format!("{}/#/runs?status=pending", c.base_url()))
        .await?;
    wait_rows(&b, 50).await?;
    assert_eq!(
        b.text("#runs-body tr:first-child .run-link")
            .await?
            .as_deref(),
        Some("queued 51"),
        "newest first"
    );
    b.screenshot("14-runs-pending-page").await?;
    b.click("#load-more").await?;
    wait_rows(&b, 52).await?;
    assert_eq!(
        b.text("#runs-body tr:last-child .run-link")
            .await?
            .as_deref(),
        Some("queued 00")
    );
    assert_eq!(
        b.js(
            "return document.getElementById('load-more').offsetParent !== null;",
            vec![]
        )
        .await?,
        false
    );
    b.close().await?;
    c.shutdown().await
}

/// An MLflow project's entry point from the New run form: its parameters as NAME=VALUE lines,
/// the command that ran on the run's page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_point_runs_from_the_form_with_its_parameters() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[
        (
            "MLproject",
            "entry_points:\n  main:\n    parameters:\n      n: int\n      name: {type: string, default: x}\n    command: python show.py {n} {name}\n",
        ),
        ("show.py", "import sys\nprint('got', sys.argv[1:])\n"),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let b = Browser::start("entry-point").await?;
    sign_in(&b, &c).await?;
    b.click("#new-run").await?;
    b.wait_for("#new-run").await?;
    b.fill("#f-repo", &repo.url()).await?;
    b.fill("#f-entry_point", "main").await?;
    b.fill("#f-parameters", "n 3").await?;
    b.click("#submit-run").await?;
    let err = b
        .wait_text("#err-parameters", LONG, |t| !t.is_empty())
        .await?;
    assert!(err.contains("NAME=VALUE"), "{err}");
    b.fill("#f-parameters", "n=3\nname=a b").await?;
    b.click("#submit-run").await?;
    let id = run_page_id(&b).await?;
    assert_eq!(
        c.job(&id).await?["spec"]["parameters"],
        json!({"n": "3", "name": "a b"})
    );
    b.wait_text("#run-status", LONG, |t| t == "succeeded")
        .await?;
    let shown = b
        .wait_text("#run-entry", LONG, |t| t.contains("show.py"))
        .await?;
    assert_eq!(shown, "python show.py 3 a b");
    b.screenshot("entry-point-run").await?;
    b.close().await?;
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lightning_run_shows_progress_plots_and_downloads_the_checkpoint() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("train.py", LIGHTNING_TRAIN)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let b = Browser::start("lightning").await?;
    sign_in(&b, &c).await?;
    b.click("#new-run").await?;
    b.wait_for("#new-run").await?;
    b.fill("#f-repo", &repo.url()).await?;
    b.fill("#f-script", "train.py").await?;
    b.fill("#f-requirements", "lightning").await?;
    b.click("#submit-run").await?;
    let id = run_page_id(&b).await?;

    // Progress moves: some value strictly between 0 and 1 is shown before the end.
    let mut seen: Vec<f64> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let v = b
            .js(
                "const e = document.querySelector('#run-progress [data-fraction]'); return e ? Number(e.dataset.fraction) : null;",
                vec![],
            )
            .await?;
        if let Some(f) = v.as_f64()
            && seen.last() != Some(&f)
        {
            seen.push(f);
        }
        let status = b.text("#run-status").await?.unwrap_or_default();
        if status == "succeeded" || status == "failed" {
            break;
        }
        if seen.iter().any(|f| *f > 0.0 && *f < 1.0) && status == "running" && seen.len() > 2 {
            // A plot is on the page while training runs.
            if b.text("#plots figure[data-metric='train_loss']")
                .await?
                .is_some()
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "training did not progress: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.screenshot("15-lightning-running").await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(300))
        .await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", c.logs(&id).await?);
    b.wait_text("#run-status", LONG, |t| t == "succeeded")
        .await?;
    assert!(
        seen.iter().any(|f| *f > 0.0 && *f < 1.0),
        "progress was seen moving: {seen:?}"
    );
    b.wait_until("progress at 100 %", LONG, || async {
        let v = b
            .js(
                "const e = document.querySelector('#run-progress [data-fraction]'); return e ? Number(e.dataset.fraction) : null;",
                vec![],
            )
            .await
            .ok()?;
        (v.as_f64() == Some(1.0)).then_some(())
    })
    .await?;

    // The val_loss plot is drawn with every epoch's point, as an image the browser decoded.
    b.wait_until("the val_loss plot", LONG, || async {
        let v = b
            .js(
                "const i = document.querySelector('img[data-metric=val_loss]'); return i && i.complete && i.naturalWidth > 0 ? Number(i.dataset.loaded) : null;",
                vec![],
            )
            .await
            .ok()?;
        v.as_f64().filter(|n| *n >= 1.0)
    })
    .await?;
    let svg = c
        .client
        .get(format!(
            "{}/api/v1/jobs/{id}/metrics.svg?metric=val_loss",
            c.base_url()
        ))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(svg.status().as_u16(), 200);
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let svg = svg.text().await?;
    assert_eq!(svg.matches("<circle").count(), 5, "one point per epoch");

    // Best score and the checkpoint download, byte for byte.
    let best = &job["best"];
    let score = b
        .wait_text("#best-score", LONG, |t| t.starts_with("val_loss = "))
        .await?;
    let shown: f64 = score.trim_start_matches("val_loss = ").parse()?;
    let want = best["score"].as_f64().unwrap_or(f64::NAN);
    assert!(
        (shown - want).abs() <= want.abs() * 1e-3,
        "{shown} vs {want}"
    );
    b.screenshot("16-lightning-done").await?;
    b.click("#download").await?;
    let file = b
        .wait_until("the downloaded checkpoint", LONG, || async {
            let entries = std::fs::read_dir(&b.downloads).ok()?;
            entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.extension().is_some_and(|e| e == "ckpt")
                    && std::fs::metadata(p).is_ok_and(|m| m.len() > 0)
            })
        })
        .await?;
    let bytes = std::fs::read(&file)?;
    let sum: String = <sha2::Sha256 as sha2::Digest>::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(Value::String(sum), best["sha256"], "{}", file.display());
    b.wait_text("#download-status", LONG, |t| t.starts_with("Downloaded"))
        .await?;
    b.close().await?;
    c.shutdown().await
}

/// Reads server-sent events from `resp` until `done` says stop; returns (kind, data) pairs.
async fn read_events(
    resp: reqwest::Response,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> anyhow::Result<Vec<(String, Value)>> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut got = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(cut) = buf.find("\n\n") {
                let block: String = buf.drain(..cut + 2).collect();
                let kind = block.lines().find_map(|l| l.strip_prefix("event: "));
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(k), Some(d)) = (kind, data) {
                    got.push((k.to_string(), serde_json::from_str(d)?));
                }
                if done(&got) {
                    return anyhow::Ok(());
                }
            }
        }
        anyhow::bail!("the event stream ended")
    };
    tokio::time::timeout(LONG, read).await??;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_sends_job_changes_and_agents() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("ticker.py", TICKER)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let url = format!("{}/api/v1/events", c.base_url());
    let r = c.client.get(&url).send().await?;
    assert_eq!(r.status().as_u16(), 401, "the stream needs the token");
    let r = c
        .client
        .get(format!("{url}?job=nope"))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 404);

    // All jobs: agents at once, then every change of a job submitted later, up to its end.
    let all = c.client.get(&url).bearer_auth(&c.token).send().await?;
    assert_eq!(all.headers()["content-type"], "text/event-stream");
    let id = c
        .submit(json!({"repo": repo.url(), "script": "ticker.py", "args": ["20", "0.05"]}))
        .await?;
    let events = read_events(all, |got| {
        got.iter()
            .any(|(k, j)| k == "job" && j["status"] == "succeeded")
    })
    .await?;
    assert_eq!(events[0].0, "agents");
    assert_eq!(events[0].1["agents"][0]["name"], "a1");
    let statuses: Vec<&str> = events
        .iter()
        .filter(|(k, j)| k == "job" && j["id"] == id.as_str())
        .map(|(_, j)| j["status"].as_str().unwrap_or(""))
        .collect();
    // Changes closer than the coalescing delay go out as one event with the latest state.
    assert_ne!(statuses.first(), Some(&"succeeded"), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&"succeeded"), "{statuses:?}");
    assert!(statuses.contains(&"running"), "{statuses:?}");

    // One job: its current state first, even when nothing changes.
    let one = c
        .client
        .get(format!("{url}?job={id}"))
        .bearer_auth(&c.token)
        .send()
        .await?;
    let events = read_events(one, |got| !got.is_empty()).await?;
    assert_eq!(events[0].0, "job");
    assert_eq!(events[0].1["status"], "succeeded");
    c.shutdown().await
}

/// Signed in with a named token, the page shows who is signed in and hides what the role may
/// not do: a viewer sees no "New run" and no Stop; a user sees Stop on its own run only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_who_is_signed_in_and_hides_what_the_role_may_not_do() -> anyhow::Result<()>
{
    let repo = GitRepo::new(&[("ticker.py", TICKER)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(2))
        .start()
        .await?;
    let mut tokens = std::collections::BTreeMap::new();
    for (name, role) in [("vera", "viewer"), ("ulla", "user")] {
        let (status, made) = c
            .post("/api/v1/tokens", &json!({"name": name, "role": role}))
            .await?;
        assert_eq!(status, 201, "{made}");
        tokens.insert(name, made["token"].as_str().unwrap_or_default().to_string());
    }
    // A run of the admin's, and one of ulla's.
    let theirs = c
        .submit(json!({"repo": repo.url(), "script": "ticker.py", "args": ["600", "0.1"]}))
        .await?;
    let r = c
        .client
        .post(format!("{}/api/v1/jobs", c.base_url()))
        .bearer_auth(&tokens["ulla"])
        .json(&json!({"repo": repo.url(), "script": "ticker.py", "args": ["600", "0.1"]}))
        .send()
        .await?;
    let mine = r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for id in [&theirs, &mine] {
        c.wait_status(id, &["running"], LONG).await?;
    }
    let b = Browser::start("roles").await?;
    let base = c.base_url();
    let visible = |css: &'static str| {
        let b = &b;
        async move {
            let v = b
                .js(
                    "const e = document.querySelector(arguments[0]); return !!e && !e.closest('[hidden]');",
                    vec![json!(css)],
                )
                .await?;
            anyhow::Ok(v == true)
        }
    };
    let sign_in_as = |token: String| {
        let b = &b;
        let base = base.clone();
        async move {
            b.goto(&format!("{base}/")).await?;
            b.js("sessionStorage.clear(); return true;", vec![]).await?;
            b.goto(&format!("{base}/#/runs")).await?;
            b.js("location.reload(); return true;", vec![]).await?;
            b.wait_for("#signin").await?;
            b.fill("#token", &token).await?;
            b.click("#signin-submit").await?;
            b.wait_for("#runs").await
        }
    };

    sign_in_as(tokens["vera"].clone()).await?;
    b.wait_text("#who", LONG, |t| t == "vera (viewer)").await?;
    assert!(
        !visible("#new-run").await?,
        "a viewer has no New run button"
    );
    assert!(!visible("a[data-nav=new]").await?, "nor the nav link");
    b.goto(&format!("{base}/#/runs/{theirs}")).await?;
    b.wait_text("#run-status", LONG, |t| t.contains("running"))
        .await?;
    assert!(!visible("#stop").await?, "a viewer cannot stop");
    assert!(!visible("#run-again").await?);
    b.goto(&format!("{base}/#/new")).await?;
    b.wait_text("#form-forbidden", LONG, |t| t.contains("viewer"))
        .await?;
    b.screenshot("viewer").await?;

    sign_in_as(tokens["ulla"].clone()).await?;
    b.wait_text("#who", LONG, |t| t == "ulla (user)").await?;
    assert!(visible("#new-run").await?);
    b.goto(&format!("{base}/#/runs/{theirs}")).await?;
    b.wait_text("#run-status", LONG, |t| t.contains("running"))
        .await?;
    assert!(!visible("#stop").await?, "not ulla's run");
    b.goto(&format!("{base}/#/runs/{mine}")).await?;
    b.wait_text("#run-status", LONG, |t| t.contains("running"))
        .await?;
    b.wait_until("Stop on ulla's own run", LONG, || async {
        visible("#stop").await.ok()?.then_some(())
    })
    .await?;
    b.click("#stop").await?;
    c.wait_status(&mine, &["stopped"], LONG).await?;
    b.close().await?;
    c.shutdown().await
}

/// Whether `css` matches an element that is shown (not inside anything hidden).
async fn shown(b: &Browser, css: &str) -> anyhow::Result<bool> {
    let v = b
        .js(
            "const e = document.querySelector(arguments[0]); return !!e && !e.closest('[hidden]');",
            vec![json!(css)],
        )
        .await?;
    Ok(v == true)
}

/// How many rows `css` matches.
async fn count(b: &Browser, css: &str) -> anyhow::Result<u64> {
    let v = b
        .js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .await?;
    Ok(v.as_u64().unwrap_or(0))
}

/// The body of the page the browser shows (a JSON answer is shown as text).
async fn page_text(b: &Browser) -> anyhow::Result<String> {
    let v = b
        .js(
            "const p = document.querySelector('pre'); return p ? p.textContent : document.body.innerText;",
            vec![],
        )
        .await?;
    Ok(v.as_str().unwrap_or("").to_string())
}

/// The services view lists a service; its page shows replicas, traffic and a plot of its last
/// hour; Scale (with a field error first) adds a replica; its link opens the service in the
/// browser through the token cookie, which never reaches the replica; signing out clears the
/// cookie; a viewer sees no Scale or Stop; Stop stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_view_shows_scales_opens_and_stops_a_service() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(2))
        .start()
        .await?;
    let spec = json!({"name": "echo", "repo": repo.url(), "script": "server.py",
        "replicas": {"min": 1, "max": 2}});
    let (status, body) = c.post("/api/v1/services", &spec).await?;
    assert_eq!(status, 201, "{body}");
    wait_service(&c, "echo", LONG, "1 ready", |v| ready(v).len() == 1).await?;
    let (status, made) = c
        .post("/api/v1/tokens", &json!({"name": "vera", "role": "viewer"}))
        .await?;
    assert_eq!(status, 201, "{made}");
    let viewer = made["token"].as_str().unwrap_or_default().to_string();

    let b = Browser::start("services").await?;
    let base = c.base_url();
    sign_in(&b, &c).await?;

    // The list: the service, ready, with its URL.
    b.click("a[data-nav=services]").await?;
    b.wait_text("#services-body tr[data-service=echo] .status", LONG, |t| {
        t == "ready"
    })
    .await?;
    let row = b
        .wait_text(
            "#services-body tr[data-service=echo] .replicas",
            LONG,
            |t| t == "1 / 1 / 2",
        )
        .await?;
    assert_eq!(row, "1 / 1 / 2", "ready / target / max");
    let link = b
        .js(
            "const a = document.querySelector('#services-body tr[data-service=echo] a[target=_blank]'); return a ? a.getAttribute('href') : null;",
            vec![],
        )
        .await?;
    assert_eq!(link, "/s/echo/");
    b.screenshot("17-services").await?;

    // Its page: one replica row, linked to its job's run page.
    b.click("#services-body tr[data-service=echo] .service-link")
        .await?;
    b.wait_text("#service-status", LONG, |t| t == "ready")
        .await?;
    b.wait_text("#replicas-body tr[data-index='1'] .state", LONG, |t| {
        t == "ready"
    })
    .await?;
    assert_eq!(count(&b, "#replicas-body tr").await?, 1);
    let v = c.get("/api/v1/services/echo").await?;
    let job = v["replicas"][0]["job"].as_str().unwrap_or_default();
    let href = b
        .js(
            "return document.querySelector('#replicas-body tr[data-index=\"1\"] .replica-job').getAttribute('href');",
            vec![],
        )
        .await?;
    assert_eq!(href, format!("#/runs/{job}").as_str());
    assert!(shown(&b, "#stop-service").await?, "the admin may stop");
    assert!(shown(&b, "#scale-submit").await?, "and scale");

    // Traffic moves with requests.
    for i in 0..6 {
        let r = c
            .client
            .get(format!("{base}/s/echo/hello?i={i}"))
            .bearer_auth(&c.token)
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 200);
    }
    b.wait_text("#traffic-total", LONG, |t| {
        t.parse::<u64>().is_ok_and(|n| n >= 6)
    })
    .await?;
    b.wait_text("#replicas-body tr[data-index='1'] .served", LONG, |t| {
        t.parse::<u64>().is_ok_and(|n| n >= 6)
    })
    .await?;
    let p50 = b.text("#traffic-latency").await?.unwrap_or_default();
    assert!(!p50.starts_with('-'), "a latency is shown: {p50}");
    // The plot of the last hour: replicas, ready and rate series from the history.
    b.wait_until("the history plot", LONG, || async {
        let n = b
            .js(
                "const s = document.querySelector('#service-plot svg'); return s ? Number(s.dataset.points) : 0;",
                vec![],
            )
            .await
            .ok()?;
        (n.as_u64()? >= 1).then_some(())
    })
    .await?;
    assert_eq!(
        count(&b, "#service-plot svg polyline[data-series]").await?,
        3
    );
    b.screenshot("18-service").await?;

    // Scale: a bad bound shows the API's message by its field; min 2 adds a second replica.
    b.fill("#scale-min", "3").await?;
    b.click("#scale-submit").await?;
    let err = b.wait_text("#err-min", LONG, |t| !t.is_empty()).await?;
    assert!(err.contains("max"), "{err}");
    assert_eq!(b.text("#err-max").await?.as_deref(), Some(""));
    assert_eq!(c.get("/api/v1/services/echo").await?["min"], 1);
    b.fill("#scale-min", "2").await?;
    b.click("#scale-submit").await?;
    b.wait_until("a second replica row", LONG, || async {
        (count(&b, "#replicas-body tr").await.ok()? == 2).then_some(())
    })
    .await?;
    assert_eq!(b.text("#err-min").await?.as_deref(), Some(""));
    b.wait_text("#decision-why", LONG, |t| {
        t.contains("scaled by a user to [2, 2]")
    })
    .await?;
    b.wait_text("#replicas-body tr[data-index='2'] .state", LONG, |t| {
        t == "ready"
    })
    .await?;
    b.screenshot("19-service-scaled").await?;

    // The service's URL in the browser: the token cookie opens it; the replica never sees the
    // token, but does see the page's other cookies.
    b.js(
        "document.cookie = 'other=1; Path=/s/; SameSite=Strict'; return true;",
        vec![],
    )
    .await?;
    b.goto(&format!("{base}/s/echo/hello")).await?;
    let text = b
        .wait_until("the replica's answer", LONG, || async {
            let t = page_text(&b).await.ok()?;
            t.contains("\"path\"").then_some(t)
        })
        .await?;
    let answer: Value = serde_json::from_str(text.trim())?;
    assert_eq!(answer["path"], "/hello", "{answer}");
    assert_eq!(answer["auth"], Value::Null, "{answer}");
    assert_eq!(answer["cookie"], "other=1", "{answer}");

    // Signing out clears the cookie: the service needs a token again.
    b.goto(&format!("{base}/#/services/echo")).await?;
    b.wait_text("#service-status", LONG, |t| t == "ready")
        .await?;
    b.click("#sign-out").await?;
    b.wait_for("#signin").await?;
    b.goto(&format!("{base}/s/echo/hello")).await?;
    let text = b
        .wait_until("the refusal", LONG, || async {
            let t = page_text(&b).await.ok()?;
            t.contains("error").then_some(t)
        })
        .await?;
    assert!(text.contains("needs a token"), "{text}");

    // A viewer sees the service but neither Scale nor Stop.
    b.goto(&format!("{base}/#/services/echo")).await?;
    b.wait_for("#signin").await?;
    b.fill("#token", &viewer).await?;
    b.click("#signin-submit").await?;
    b.wait_text("#who", LONG, |t| t == "vera (viewer)").await?;
    b.wait_text("#service-status", LONG, |t| t == "ready")
        .await?;
    assert_eq!(count(&b, "#replicas-body tr").await?, 2);
    assert!(!shown(&b, "#stop-service").await?, "a viewer cannot stop");
    assert!(!shown(&b, "#scale-submit").await?, "nor scale");
    b.screenshot("20-service-viewer").await?;

    // A phone-sized viewport: nothing wider than the screen.
    b.client.set_window_size(390, 844).await?;
    for (page, name) in [
        ("#/services", "21-services-narrow"),
        ("#/services/echo", "22-service-narrow"),
    ] {
        b.goto(&format!("{base}/{page}")).await?;
        b.wait_for("main h1").await?;
        b.wait_for("main .status").await?;
        let overflow = b
            .js(
                "return document.documentElement.scrollWidth - window.innerWidth;",
                vec![],
            )
            .await?;
        assert!(
            overflow.as_i64().unwrap_or(99) <= 0,
            "{page} is wider than a phone screen by {overflow} px"
        );
        b.screenshot(name).await?;
    }
    b.client.set_window_size(1280, 900).await?;

    // The admin stops it from the page.
    b.click("#sign-out").await?;
    b.wait_for("#signin").await?;
    b.fill("#token", &c.token).await?;
    b.click("#signin-submit").await?;
    b.wait_for("#stop-service").await?;
    b.click("#stop-service").await?;
    b.wait_text("#service-status", LONG, |t| {
        t == "stopping" || t == "stopped"
    })
    .await?;
    wait_service(&c, "echo", LONG, "stopped", |v| v["status"] == "stopped").await?;
    b.wait_text("#service-status", LONG, |t| t == "stopped")
        .await?;
    assert!(!shown(&b, "#stop-service").await?);
    b.goto(&format!("{base}/#/services")).await?;
    b.wait_text("#services-body tr[data-service=echo] .status", LONG, |t| {
        t == "stopped"
    })
    .await?;
    b.close().await?;
    c.shutdown().await
}
