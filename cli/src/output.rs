//! Text output of the client commands: tables, `key: value` blocks and ages.
//!
//! Invariant: rendering is pure (the current time is passed in); writing goes through
//! `write_stdout`, which reports a closed stdout as an error instead of panicking.

use std::io::Write;
use std::time::Duration;

use runyard_api::{AgentView, JobView, PlacementView};
use runyard_model::{Best, Timestamp};

use crate::progress;

/// Shown for an absent value.
const NONE: &str = "-";
/// Significant digits of metrics in `runyard status`.
const STATUS_DIGITS: usize = 6;

/// Columns left-aligned, two spaces apart, no trailing spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Compact age: `42s`, `5m`, `3h`, `12d`.
pub fn age(now: Timestamp, then: Timestamp) -> String {
    let secs = now.saturating_since(then).as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// The `runyard ls` table.
pub fn jobs_table(jobs: &[JobView], now: Timestamp) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.name.clone(),
                j.status.to_string(),
                j.spec.compute.to_string(),
                j.agent.clone().unwrap_or_else(|| NONE.into()),
                age(now, j.created_at),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATUS", "COMPUTE", "AGENT", "AGE"], &rows)
}

/// The `runyard agents` table.
pub fn agents_table(agents: &[AgentView], now: Timestamp) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                if a.connected { "yes" } else { "no" }.to_string(),
                a.cpu_small_slots.to_string(),
                a.gpus.len().to_string(),
                a.jobs.len().to_string(),
                format!("{} ago", age(now, a.last_seen)),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "CONNECTED",
            "CPU-SMALL",
            "GPUS",
            "JOBS",
            "LAST SEEN",
        ],
        &rows,
    )
}

/// The `runyard attempts` table: one row per placement, oldest first.
pub fn placements_table(placements: &[PlacementView], now: Timestamp) -> String {
    let rows: Vec<Vec<String>> = placements
        .iter()
        .map(|p| {
            let gpus: Vec<String> = p.gpus.iter().map(u32::to_string).collect();
            let ran = match (p.started_at, p.finished_at) {
                (Some(s), Some(f)) => age(f, s),
                (Some(s), None) => age(now, s),
                _ => NONE.into(),
            };
            vec![
                p.attempt.to_string(),
                p.agent.clone(),
                if gpus.is_empty() {
                    NONE.into()
                } else {
                    gpus.join(",")
                },
                p.status.to_string(),
                p.exit_code.map_or_else(|| NONE.into(), |c| c.to_string()),
                format!("{} ago", age(now, p.scheduled_at)),
                ran,
                p.reason
                    .as_deref()
                    .map_or_else(|| NONE.into(), crate::client::one_line),
            ]
        })
        .collect();
    table(
        &[
            "ATTEMPT", "AGENT", "GPUS", "STATUS", "EXIT", "PLACED", "RAN", "REASON",
        ],
        &rows,
    )
}

/// The `runyard status` block: one `key: value` line per field, `-` when absent.
pub fn job_details(job: &JobView, now: Timestamp) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| NONE.into());
    let time = |t: Option<Timestamp>| {
        t.map(|t| format!("{t} ({} ago)", age(now, t)))
            .unwrap_or_else(|| NONE.into())
    };
    let spec = &job.spec;
    let list = |v: &[String]| {
        if v.is_empty() {
            NONE.to_string()
        } else {
            v.iter()
                .map(|s| shell_quote(s))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("id", job.id.clone()),
        ("name", job.name.clone()),
        ("status", job.status.to_string()),
        (
            "desired",
            serde_json::to_value(job.desired)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        ("reason", opt(job.reason.clone())),
        ("failure", opt(job.failure.map(|f| f.as_str().to_string()))),
        ("exit code", opt(job.exit_code.map(|c| c.to_string()))),
        ("attempt", job.attempt.to_string()),
        ("agent", opt(job.agent.clone())),
        (
            "gpus",
            if job.gpus.is_empty() {
                NONE.into()
            } else {
                job.gpus
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ),
        ("lost", job.lost_count.to_string()),
        (
            "failures",
            format!("{} (retries {})", job.failures, spec.retries),
        ),
        ("repo", spec.repo.clone()),
        (
            "revision",
            if spec.revision.is_empty() {
                "(default branch)".into()
            } else {
                spec.revision.clone()
            },
        ),
        ("commit", opt(job.commit.clone())),
        ("script", spec.script.clone()),
        ("args", list(&spec.args)),
    ];
    if let Some(entry) = &spec.entry_point {
        fields.retain(|(k, _)| *k != "script" && *k != "args");
        let given: Vec<String> = spec
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        fields.push(("entry point", entry.clone()));
        fields.push(("parameters", list(&given)));
        if let Some(p) = &job.project {
            fields.push(("command", p.argv.join(" ")));
            fields.push(("project env", p.env.clone()));
        }
    }
    if let Some(run) = &job.mlflow {
        fields.push(("mlflow run", run.url.clone()));
    }
    fields.extend([
        ("requirements", list(&spec.requirements)),
        ("requirements file", opt(spec.requirements_file.clone())),
        ("compute", spec.compute.to_string()),
        ("timeout", opt(spec.timeout.map(human_duration))),
        ("stop grace", human_duration(spec.stop_grace)),
        ("memory", opt(spec.memory.map(runyard_model::size::format))),
        ("created", time(Some(job.created_at))),
        ("scheduled", time(job.scheduled_at)),
        ("started", time(job.started_at)),
        ("finished", time(job.finished_at)),
        ("updated", time(Some(job.updated_at))),
    ]);
    fields.extend(training_fields(job));
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in fields {
        out.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }
    out
}

/// What a training run reported, only the parts it did report: progress, latest metrics, the
/// best checkpoint and its upload, the environment.
fn training_fields(job: &JobView) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    if let Some(p) = &job.progress {
        fields.push((
            "progress",
            format!(
                "{}, {}%",
                progress::position(p, ", "),
                progress::percent(p.fraction)
            ),
        ));
    }
    if !job.metrics.is_empty() {
        let metrics: Vec<String> = job
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={}", number(*v)))
            .collect();
        fields.push(("metrics", metrics.join(" ")));
    }
    if let Some(best) = &job.best {
        fields.push(("best", best_text(best)));
        fields.push((
            "checkpoint",
            checkpoint_text(best, job.status.is_terminal()),
        ));
    }
    if let Some(env) = &job.environment {
        fields.push((
            "environment",
            format!(
                "{}, {} packages, built in {:.1}s",
                env.installer,
                env.packages.len(),
                env.seconds
            ),
        ));
    }
    fields
}

/// A metric or score as `status` shows it: six significant digits (`--json` has them all).
fn number(v: f64) -> String {
    progress::significant(v, STATUS_DIGITS)
}

/// `val_loss=0.41 (min), epoch 2, step 40`.
fn best_text(best: &Best) -> String {
    let mut parts = Vec::new();
    match (&best.monitor, best.score) {
        (Some(m), Some(score)) => parts.push(format!("{m}={}", number(score))),
        (Some(m), None) => parts.push(format!("{m} (no score yet)")),
        (None, Some(score)) => parts.push(format!("score {}", number(score))),
        (None, None) => parts.push("last saved (no monitor)".to_string()),
    }
    if let Some(mode) = &best.mode {
        parts[0].push_str(&format!(" ({mode})"));
    }
    if let Some(epoch) = best.epoch {
        parts.push(format!("epoch {epoch}"));
    }
    if let Some(step) = best.step {
        parts.push(format!("step {step}"));
    }
    parts.join(", ")
}

/// `best.ckpt, 1.2 MiB (1234567 bytes), sha256 ...`, or why it is not there.
fn checkpoint_text(best: &Best, terminal: bool) -> String {
    let name = best
        .path
        .rsplit(['/', '\\'])
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(&best.path);
    if let Some(error) = &best.upload_error {
        return format!("{name}: upload failed: {error}");
    }
    match best.size {
        Some(n) => {
            let mut s = format!("{name}, {}", size(n));
            if let Some(sha) = &best.sha256 {
                s.push_str(&format!(", sha256 {sha}"));
            }
            s
        }
        None if terminal => format!("{name}, not uploaded"),
        None => format!("{name}, uploaded when the job ends"),
    }
}

/// `12 bytes`, or `1.2 MiB (1234567 bytes)`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
}

/// The final line `submit --follow` writes to stderr.
pub fn final_status(job: &JobView) -> String {
    match &job.reason {
        Some(reason) if !reason.is_empty() => {
            format!("job {} {}: {reason}", job.id, job.status)
        }
        _ => format!("job {} {}", job.id, job.status),
    }
}

fn human_duration(d: Duration) -> String {
    runyard_model::spec::format_duration(d)
}

/// Quotes an argument only when a shell would split or expand it, for display.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Writes to stdout and flushes (so streamed logs show at once).
pub fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Writes a JSON body as received, ending it with a newline.
pub fn write_json(raw: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(raw)?;
    if !raw.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::{Compute, GpuInfo, Job, JobSpec, JobStatus};

    const NOW: Timestamp = Timestamp(1_700_000_000_000);

    fn job(id: &str, name: &str) -> JobView {
        let spec = JobSpec::from_value(serde_json::json!({
            "repo": "https://example.com/a/b.git",
            "script": "train.py",
            "name": name,
        }))
        .unwrap();
        JobView::from(&Job::new(id.into(), spec, NOW.plus(Duration::from_secs(0))))
    }

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let t = table(
            &["ID", "NAME", "X"],
            &[
                vec!["1".into(), "long-name".into(), "".into()],
                vec!["22".into(), "n".into(), "v".into()],
            ],
        );
        assert_eq!(t, "ID  NAME       X\n1   long-name\n22  n          v\n");
    }

    #[test]
    fn jobs_table_shows_every_column() {
        let mut a = job("01A", "train");
        a.created_at = Timestamp(NOW.0 - 90_000);
        let mut b = job("01B", "a much longer name");
        b.status = JobStatus::Running;
        b.agent = Some("gpu-box-1".into());
        b.spec.compute = Compute::Gpu(2);
        b.created_at = Timestamp(NOW.0 - 3 * 86_400_000);
        let t = jobs_table(&[a, b], NOW);
        let expected = "\
ID   NAME                STATUS   COMPUTE    AGENT      AGE
01A  train               pending  cpu-small  -          1m
01B  a much longer name  running  gpu:2      gpu-box-1  3d
";
        assert_eq!(t, expected);
    }

    #[test]
    fn agents_table_counts_gpus_and_jobs() {
        let gpu = GpuInfo {
            index: 0,
            uuid: "GPU-1".into(),
            name: "Fake".into(),
            memory_total_bytes: 1,
            memory_used_bytes: 0,
            utilization_percent: 0,
        };
        let a = AgentView {
            name: "box".into(),
            connected: true,
            cpu_small_slots: 4,
            gpus: vec![gpu.clone(), GpuInfo { index: 1, ..gpu }],
            cpus: 8,
            memory_bytes: 1 << 30,
            version: "0.1.0".into(),
            last_seen: Timestamp(NOW.0 - 5_000),
            jobs: vec!["01A".into()],
        };
        let t = agents_table(&[a], NOW);
        assert_eq!(
            t,
            "NAME  CONNECTED  CPU-SMALL  GPUS  JOBS  LAST SEEN\nbox   yes        4          2     1     5s ago\n"
        );
    }

    #[test]
    fn ages() {
        let at = |s: u64| age(Timestamp(NOW.0 + s * 1000), NOW);
        assert_eq!(at(0), "0s");
        assert_eq!(at(59), "59s");
        assert_eq!(at(60), "1m");
        assert_eq!(at(3599), "59m");
        assert_eq!(at(3600), "1h");
        assert_eq!(at(47 * 3600), "47h");
        assert_eq!(at(48 * 3600), "2d");
        // A clock behind the server's shows 0s, not a panic.
        assert_eq!(age(NOW, Timestamp(NOW.0 + 10_000)), "0s");
    }

    #[test]
    fn details_show_an_entry_point_its_command_and_its_mlflow_run() {
        let spec = JobSpec::from_value(serde_json::json!({
            "repo": "https://example.com/a/b.git",
            "parameters": {"alpha": "0.5"},
        }))
        .unwrap();
        let mut j = JobView::from(&Job::new("01E".into(), spec, NOW));
        j.project = Some(runyard_model::mlproject::ProjectRun {
            entry_point: "main".into(),
            parameters: [("alpha".to_string(), "0.5".to_string())].into(),
            env: "python_env".into(),
            argv: vec!["python".into(), "train.py".into(), "0.5".into()],
        });
        j.mlflow = Some(runyard_api::MlflowView {
            tracking_uri: "http://m:5000".into(),
            run_id: "abc".into(),
            experiment_id: "1".into(),
            url: "http://m:5000/#/experiments/1/runs/abc".into(),
            ended: false,
        });
        let text = job_details(&j, NOW);
        for line in [
            "entry point:       main\n",
            "parameters:        alpha=0.5\n",
            "command:           python train.py 0.5\n",
            "project env:       python_env\n",
            "mlflow run:        http://m:5000/#/experiments/1/runs/abc\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert!(!text.contains("script:"), "{text}");
    }

    #[test]
    fn details_show_what_a_training_run_reported() {
        let mut j = job("01T", "train");
        let plain = job_details(&j, NOW);
        for key in [
            "progress:",
            "metrics:",
            "best:",
            "checkpoint:",
            "environment:",
        ] {
            assert!(
                !plain.contains(key),
                "{key} shown without a report:\n{plain}"
            );
        }
        j.status = JobStatus::Succeeded;
        j.progress = Some(runyard_model::Progress {
            epoch: 2,
            max_epochs: Some(3),
            step: 40,
            max_steps: Some(60),
            fraction: 40.0 / 60.0,
        });
        j.metrics.insert("val_loss".into(), 0.41);
        j.metrics.insert("acc".into(), 0.875);
        j.metrics.insert("lr".into(), 1.0 / 3.0);
        j.best = Some(Best {
            monitor: Some("val_loss".into()),
            mode: Some("min".into()),
            score: Some(0.41),
            path: "/jobs/01T/ckpt/epoch=2-step=40.ckpt".into(),
            size: Some(1_572_864),
            sha256: Some("ab12".into()),
            epoch: Some(2),
            step: Some(40),
            upload_error: None,
        });
        j.environment = Some(runyard_model::Environment {
            installer: "uv".into(),
            packages: vec!["numpy==2.1.0".into(), "six==1.16.0".into()],
            seconds: 1.94,
        });
        let d = job_details(&j, NOW);
        for line in [
            "progress:          epoch 2/3, step 40/60, 67%",
            "metrics:           acc=0.875 lr=0.333333 val_loss=0.41",
            "best:              val_loss=0.41 (min), epoch 2, step 40",
            "checkpoint:        epoch=2-step=40.ckpt, 1.5 MiB (1572864 bytes), sha256 ab12",
            "environment:       uv, 2 packages, built in 1.9s",
        ] {
            assert!(d.lines().any(|l| l == line), "missing {line:?} in\n{d}");
        }
        let best = j.best.as_mut().unwrap();
        best.upload_error = Some("file is gone".into());
        let d = job_details(&j, NOW);
        assert!(
            d.lines().any(
                |l| l == "checkpoint:        epoch=2-step=40.ckpt: upload failed: file is gone"
            ),
            "{d}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0 bytes");
        assert_eq!(size(1023), "1023 bytes");
        assert_eq!(size(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(size(3 << 30), "3.0 GiB (3221225472 bytes)");
    }

    #[test]
    fn details_name_reason_commit_exit_code_and_times() {
        let mut j = job("01A", "train");
        j.status = JobStatus::Failed;
        j.reason = Some("script exited 3".into());
        j.exit_code = Some(3);
        j.commit = Some("abc123".into());
        j.attempt = 2;
        j.agent = Some("box".into());
        j.spec.args = vec!["--lr".into(), "0.1 0.2".into()];
        j.finished_at = Some(Timestamp(NOW.0 + 60_000));
        let d = job_details(&j, Timestamp(NOW.0 + 120_000));
        for line in [
            "status:            failed",
            "reason:            script exited 3",
            "exit code:         3",
            "attempt:           2",
            "agent:             box",
            "commit:            abc123",
            "args:              --lr '0.1 0.2'",
            "scheduled:         -",
            "finished:          2023-11-14T22:14:20.000Z (1m ago)",
        ] {
            assert!(d.lines().any(|l| l == line), "missing {line:?} in\n{d}");
        }
        assert_eq!(
            final_status(&j),
            "job 01A failed: script exited 3".to_string()
        );
    }
}
