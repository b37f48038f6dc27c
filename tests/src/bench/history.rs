//! A synthetic history for the benchmark's `history` case: finished jobs shaped like real ones
//! (a spec with arguments and requirements, a commit, a few metrics, and on every tenth job a
//! Lightning-sized pinned environment and a best checkpoint), as store records.

use std::collections::BTreeMap;

use runyard_model::report::{Best, Environment, Progress};
use runyard_model::{FailureKind, Job, JobSpec, JobStatus, Timestamp};

/// Store key and JSON value of the `i`-th finished job; ids sort by `i` like real (ULID) ids.
pub fn finished_job(i: usize) -> (String, Vec<u8>) {
    let body = format!(
        r#"{{"name":"sweep-{i}","repo":"https://git.example.com/team/train.git","revision":"main",
            "script":"train.py","args":["--lr","0.0{}","--epochs","3","--seed","{i}"],
            "requirements":["lightning","numpy"],"compute":"cpu-small"}}"#,
        1 + i % 9
    );
    let spec = JobSpec::from_json(body.as_bytes()).expect("the bench spec is valid");
    let created = 1_700_000_000_000 + i as u64 * 1_000;
    let mut j = Job::new(format!("01h{i:023}"), spec, Timestamp(created));
    j.attempt = 1;
    j.agent = Some(format!("agent-{}", i % 50));
    j.commit = Some(format!("{:040x}", i as u128 * 0x9e37_79b9_7f4a_7c15));
    j.scheduled_at = Some(Timestamp(created + 5));
    j.started_at = Some(Timestamp(created + 40));
    j.finished_at = Some(Timestamp(created + 60_000));
    j.updated_at = Timestamp(created + 60_000);
    if i.is_multiple_of(3) {
        j.status = JobStatus::Failed;
        j.exit_code = Some(1);
        j.failure = Some(FailureKind::Exit);
        j.reason = Some("script exited with code 1".into());
    } else {
        j.status = JobStatus::Succeeded;
        j.exit_code = Some(0);
    }
    j.progress = Some(Progress {
        epoch: 2,
        max_epochs: Some(3),
        step: 300,
        max_steps: Some(300),
        fraction: 1.0,
    });
    j.metrics = BTreeMap::from([
        ("train_loss".to_string(), 0.25),
        ("val_loss".to_string(), 0.31),
        ("val_acc".to_string(), 0.9),
    ]);
    if i.is_multiple_of(10) {
        j.environment = Some(Environment {
            installer: "uv".into(),
            packages: (0..46).map(|p| format!("package-{p}==1.{p}.0")).collect(),
            seconds: 1.4,
        });
        j.best = Some(Best {
            monitor: Some("val_loss".into()),
            mode: Some("min".into()),
            score: Some(0.31),
            path: "/var/lib/runyard/jobs/x/checkpoints/epoch=2.ckpt".into(),
            size: Some(1 << 20),
            sha256: Some("ab".repeat(32)),
            epoch: Some(2),
            step: Some(300),
            ..Best::default()
        });
    }
    let value = serde_json::to_vec(&j).expect("a job serializes");
    (format!("jobs/{}", j.id), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_finished_ordered_and_realistic() {
        let (k1, v1) = finished_job(1);
        let (k2, _) = finished_job(2);
        assert!(k1 < k2);
        let j: Job = serde_json::from_slice(&v1).unwrap();
        assert!(j.status.is_terminal());
        assert_eq!(format!("jobs/{}", j.id), k1);
        let (_, big) = finished_job(10);
        assert!(
            v1.len() > 800 && big.len() > v1.len(),
            "{} {}",
            v1.len(),
            big.len()
        );
    }
}
