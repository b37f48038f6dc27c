//! A synthetic history for the benchmark's `history` case: finished jobs shaped like real ones
//! (a spec with arguments and requirements, a commit, a few metrics, and on every tenth job a
//! Lightning-sized pinned environment and a best checkpoint), as store records: an intent and
//! its placement per job.

use std::collections::BTreeMap;

use runyard_model::report::{Best, Environment, Progress};
use runyard_model::{FailureKind, JobSpec, JobState, JobStatus, Placement, Timestamp};

/// The id of the `i`-th job; ids sort by `i` like real (ULID) ids.
pub fn job_id(i: usize) -> String {
    format!("01h{i:023}")
}

/// Store keys and JSON values of the `i`-th finished job: its intent, then its placement.
pub fn finished_job(i: usize) -> [(String, Vec<u8>); 2] {
    let body = format!(
        r#"{{"name":"sweep-{i}","repo":"https://git.example.com/team/train.git","revision":"main",
            "script":"train.py","args":["--lr","0.0{}","--epochs","3","--seed","{i}"],
            "requirements":["lightning","numpy"],"compute":"cpu-small"}}"#,
        1 + i % 9
    );
    let spec = JobSpec::from_json(body.as_bytes()).expect("the bench spec is valid");
    let created = 1_700_000_000_000 + i as u64 * 1_000;
    let mut s = JobState::new(job_id(i), spec, Timestamp(created));
    let mut p = Placement::new(
        &s.intent.id,
        1,
        &format!("agent-{}", i % 50),
        Vec::new(),
        Timestamp(created + 5),
    );
    let j = &mut s.intent;
    j.attempt = 1;
    p.commit = Some(format!("{:040x}", i as u128 * 0x9e37_79b9_7f4a_7c15));
    p.started_at = Some(Timestamp(created + 40));
    j.finished_at = Some(Timestamp(created + 60_000));
    p.finished_at = j.finished_at;
    j.updated_at = Timestamp(created + 60_000);
    p.updated_at = j.updated_at;
    if i.is_multiple_of(3) {
        j.status = JobStatus::Failed;
        p.exit_code = Some(1);
        j.failure = Some(FailureKind::Exit);
        j.reason = Some("script exited with code 1".into());
        (p.failure, p.reason) = (j.failure, j.reason.clone());
    } else {
        j.status = JobStatus::Succeeded;
        p.exit_code = Some(0);
    }
    p.status = j.status;
    p.progress = Some(Progress {
        epoch: 2,
        max_epochs: Some(3),
        step: 300,
        max_steps: Some(300),
        fraction: 1.0,
    });
    p.metrics = BTreeMap::from([
        ("train_loss".to_string(), 0.25),
        ("val_loss".to_string(), 0.31),
        ("val_acc".to_string(), 0.9),
    ]);
    if i.is_multiple_of(10) {
        p.environment = Some(Environment {
            installer: "uv".into(),
            packages: (0..46).map(|p| format!("package-{p}==1.{p}.0")).collect(),
            seconds: 1.4,
        });
        p.best = Some(Best {
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
    let id = s.intent.id.clone();
    [
        (
            runyard_controller::jobs::intent_key(&id),
            serde_json::to_vec(&s.intent).expect("an intent serializes"),
        ),
        (
            runyard_controller::jobs::placement_key(&id, 1),
            serde_json::to_vec(&p).expect("a placement serializes"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_finished_ordered_and_realistic() {
        let [(k1, v1), (p1, pv1)] = finished_job(1);
        let [(k2, _), _] = finished_job(2);
        assert!(k1 < k2);
        let j: runyard_model::Intent = serde_json::from_slice(&v1).unwrap();
        assert!(j.status.is_terminal());
        assert_eq!(format!("jobs/{}", j.id), k1);
        let p: Placement = serde_json::from_slice(&pv1).unwrap();
        assert_eq!((p.job.as_str(), p.status), (j.id.as_str(), j.status));
        assert_eq!(p1, format!("placements/{}/0000000001", j.id));
        let [_, (_, big)] = finished_job(10);
        assert!(
            pv1.len() > 300 && big.len() > pv1.len(),
            "{} {}",
            pv1.len(),
            big.len()
        );
    }
}
