//! What a running job reports besides its log: training progress, metrics, checkpoints and the
//! environment it ran with. Each report is one JSON line on the attempt's report stream; the
//! Lightning reporter writes them, plain scripts may too (README "Reporting from a script"), and
//! the agent adds `environment` and `artifact` lines of its own.
//!
//! `apply` folds one report into the job; it is pure and idempotent for a repeated line.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::placement::Placement;

/// One report line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    /// Training started (Lightning's `on_train_start`).
    Started {
        #[serde(default)]
        max_epochs: Option<u64>,
        #[serde(default)]
        max_steps: Option<u64>,
        #[serde(default)]
        batches_per_epoch: Option<u64>,
    },
    Progress {
        #[serde(default)]
        epoch: u64,
        #[serde(default)]
        max_epochs: Option<u64>,
        #[serde(default)]
        step: u64,
        #[serde(default)]
        max_steps: Option<u64>,
        /// 0..1; derived from steps or epochs when absent.
        #[serde(default)]
        fraction: Option<f64>,
    },
    /// Logged metrics at one point of training; non-finite values are left out by the writer.
    Metrics {
        #[serde(default)]
        epoch: Option<u64>,
        #[serde(default)]
        step: Option<u64>,
        values: BTreeMap<String, f64>,
        /// Unix time in seconds.
        #[serde(default)]
        time: Option<f64>,
    },
    /// A `ModelCheckpoint`'s state: `callback` numbers them in the trainer's order.
    Checkpoint {
        #[serde(default)]
        callback: u32,
        #[serde(default)]
        monitor: Option<String>,
        #[serde(default)]
        mode: Option<String>,
        #[serde(default)]
        score: Option<f64>,
        path: String,
        #[serde(default)]
        epoch: Option<u64>,
        #[serde(default)]
        step: Option<u64>,
    },
    /// The agent uploaded (or could not upload) the best checkpoint.
    Artifact {
        path: String,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        sha256: Option<String>,
        #[serde(default)]
        error: Option<String>,
    },
    /// The environment the job ran with (written by the agent).
    Environment(Environment),
    /// The MLflow project entry point as the agent ran it (written by the agent).
    Project(crate::mlproject::ProjectRun),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub epoch: u64,
    pub max_epochs: Option<u64>,
    pub step: u64,
    pub max_steps: Option<u64>,
    /// 0..1.
    pub fraction: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Best {
    pub monitor: Option<String>,
    pub mode: Option<String>,
    pub score: Option<f64>,
    /// Path of the checkpoint file on the agent.
    pub path: String,
    /// Size and checksum of the uploaded file; `None` until uploaded.
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub epoch: Option<u64>,
    pub step: Option<u64>,
    /// Why the checkpoint could not be uploaded, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Environment {
    /// `uv`, `pip`, or `system` (no requirements: the agent's interpreter as is).
    pub installer: String,
    /// The resolved, pinned set (`name==version`).
    pub packages: Vec<String>,
    /// Time to build the environment.
    pub seconds: f64,
}

/// One point of a metric's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricPoint {
    pub step: Option<u64>,
    pub epoch: Option<u64>,
    pub value: f64,
    pub time: Option<f64>,
}

impl Report {
    /// Parses one report line; `None` for anything that is not a report (ignored, not fatal).
    pub fn parse(line: &str) -> Option<Report> {
        serde_json::from_str(line.trim()).ok()
    }
}

/// Folds a report into its attempt's summary fields (`progress`, `metrics`, `best`,
/// `environment`).
pub fn apply(job: &mut Placement, report: &Report) {
    match report {
        Report::Started {
            max_epochs,
            max_steps,
            ..
        } => {
            job.progress = Some(Progress {
                max_epochs: *max_epochs,
                max_steps: max_steps.filter(|s| *s > 0),
                ..Progress::default()
            });
        }
        Report::Progress {
            epoch,
            max_epochs,
            step,
            max_steps,
            fraction,
        } => {
            let prev = job.progress.clone().unwrap_or_default();
            let max_epochs = max_epochs.or(prev.max_epochs);
            let max_steps = max_steps.filter(|s| *s > 0).or(prev.max_steps);
            let derived = match (max_steps, max_epochs) {
                (Some(ms), _) => *step as f64 / ms as f64,
                (None, Some(me)) if me > 0 => *epoch as f64 / me as f64,
                _ => prev.fraction,
            };
            let fraction = fraction
                .filter(|f| f.is_finite())
                .unwrap_or(derived)
                .clamp(0.0, 1.0);
            job.progress = Some(Progress {
                epoch: *epoch,
                max_epochs,
                step: *step,
                max_steps,
                fraction,
            });
        }
        Report::Metrics { values, .. } => {
            for (k, v) in values {
                if v.is_finite() {
                    job.metrics.insert(k.clone(), *v);
                }
            }
        }
        Report::Checkpoint {
            callback,
            monitor,
            mode,
            score,
            path,
            epoch,
            step,
        } => {
            // The job's best is the first checkpoint callback that monitors something (else the
            // first one); reports of other callbacks don't replace it.
            let mine = job.best_callback.is_none_or(|c| c == *callback)
                || (monitor.is_some() && job.best.as_ref().is_some_and(|b| b.monitor.is_none()));
            if mine && !path.is_empty() {
                job.best_callback = Some(*callback);
                job.best = Some(Best {
                    monitor: monitor.clone(),
                    mode: mode.clone(),
                    score: score.filter(|s| s.is_finite()),
                    path: path.clone(),
                    size: None,
                    sha256: None,
                    epoch: *epoch,
                    step: *step,
                    upload_error: None,
                });
            }
        }
        Report::Artifact {
            path,
            size,
            sha256,
            error,
        } => {
            if let Some(b) = job.best.as_mut().filter(|b| &b.path == path) {
                b.size = *size;
                b.sha256 = sha256.clone();
                b.upload_error = error.clone();
            }
        }
        Report::Environment(env) => job.environment = Some(env.clone()),
        Report::Project(run) => job.project = Some(run.clone()),
    }
}

/// The metric history of a report stream, by metric name.
pub fn series<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, Vec<MetricPoint>> {
    let mut out: BTreeMap<String, Vec<MetricPoint>> = BTreeMap::new();
    for line in lines {
        if let Some(Report::Metrics {
            epoch,
            step,
            values,
            time,
        }) = Report::parse(line)
        {
            for (name, value) in values {
                if value.is_finite() {
                    out.entry(name).or_default().push(MetricPoint {
                        step,
                        epoch,
                        value,
                        time,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn job() -> Placement {
        Placement::new("j", 1, "a", Vec::new(), Timestamp(0))
    }

    fn fold(lines: &[&str]) -> Placement {
        let mut j = job();
        for l in lines {
            apply(
                &mut j,
                &Report::parse(l).unwrap_or_else(|| panic!("bad line {l}")),
            );
        }
        j
    }

    #[test]
    fn progress_fraction_is_derived() {
        let j = fold(&[
            r#"{"type":"started","max_epochs":4,"batches_per_epoch":10}"#,
            r#"{"type":"progress","epoch":1,"step":10}"#,
        ]);
        assert_eq!(j.progress.as_ref().unwrap().fraction, 0.25);
        let j = fold(&[r#"{"type":"progress","epoch":1,"step":50,"max_steps":200}"#]);
        assert_eq!(j.progress.unwrap().fraction, 0.25);
        let j = fold(&[r#"{"type":"progress","epoch":9,"step":9,"max_epochs":4,"fraction":7}"#]);
        assert_eq!(j.progress.unwrap().fraction, 1.0);
    }

    #[test]
    fn metrics_keep_latest_and_history() {
        let lines = [
            r#"{"type":"metrics","epoch":0,"step":10,"values":{"val_loss":0.9,"acc":0.5}}"#,
            r#"{"type":"metrics","epoch":1,"step":20,"values":{"val_loss":0.7}}"#,
            "not json",
            r#"{"type":"unknown_kind"}"#,
        ];
        let mut j = job();
        for l in &lines {
            if let Some(r) = Report::parse(l) {
                apply(&mut j, &r);
            }
        }
        assert_eq!(j.metrics["val_loss"], 0.7);
        assert_eq!(j.metrics["acc"], 0.5);
        let s = series(lines);
        assert_eq!(
            s["val_loss"].iter().map(|p| p.value).collect::<Vec<_>>(),
            vec![0.9, 0.7]
        );
        assert_eq!(s["val_loss"][1].step, Some(20));
    }

    #[test]
    fn best_follows_the_first_monitoring_checkpoint() {
        let j = fold(&[
            r#"{"type":"checkpoint","callback":0,"path":"/c/last.ckpt"}"#,
            r#"{"type":"checkpoint","callback":1,"monitor":"val_loss","mode":"min","score":0.5,"path":"/c/a.ckpt","epoch":1}"#,
            r#"{"type":"checkpoint","callback":2,"monitor":"acc","mode":"max","score":0.9,"path":"/c/b.ckpt"}"#,
            r#"{"type":"checkpoint","callback":1,"monitor":"val_loss","mode":"min","score":0.4,"path":"/c/c.ckpt","epoch":2}"#,
            r#"{"type":"artifact","path":"/c/c.ckpt","size":12,"sha256":"ab"}"#,
        ]);
        let b = j.best.unwrap();
        assert_eq!(
            (b.monitor.as_deref(), b.score, b.path.as_str()),
            (Some("val_loss"), Some(0.4), "/c/c.ckpt")
        );
        assert_eq!((b.size, b.sha256.as_deref()), (Some(12), Some("ab")));
    }
}

#[cfg(test)]
mod environment_tests {
    use super::*;

    #[test]
    fn environment_round_trips() {
        let r = Report::Environment(Environment {
            installer: "uv".into(),
            packages: vec!["six==1.16.0".into()],
            seconds: 1.5,
        });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(Report::parse(&line), Some(r), "{line}");
    }
}
