//! The controller follows its store through failures: a write that committed but timed out, a
//! write that failed, another writer getting in first, and a job whose writes keep failing. Each
//! case runs on the embedded store and on a real etcd, behind `FaultyStore`.

use std::sync::Arc;
use std::time::Duration;

use runyard_controller::Controller;
use runyard_controller::agents::Agents;
use runyard_controller::artifacts::DirStore;
use runyard_controller::jobs::Jobs;
use runyard_controller::logs::LogStore;
use runyard_controller::store::{self, Precondition, Store};
use runyard_model::{AgentInfo, Intent, Job, JobSpec, JobState, JobStatus, Timestamp};
use runyard_tests::etcd::EtcdServer;
use runyard_tests::eventually;
use runyard_tests::faulty_store::{Fault, FaultyStore};
use tokio_util::sync::CancellationToken;

const CASE_DEADLINE: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);

/// A store under test: the directory (and etcd server) live as long as it.
struct Backend {
    dir: tempfile::TempDir,
    _etcd: Option<EtcdServer>,
    store: Arc<dyn Store>,
}

impl Backend {
    async fn file() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = store::open("file:", dir.path()).await.unwrap();
        Backend {
            dir,
            _etcd: None,
            store,
        }
    }

    async fn etcd() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let server = EtcdServer::start().await.expect("start etcd");
        let store = store::open(&server.url(), dir.path()).await.unwrap();
        Backend {
            dir,
            _etcd: Some(server),
            store,
        }
    }
}

fn spec() -> JobSpec {
    JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py","compute":"cpu-small"}"#).unwrap()
}

fn new_job(id: &str, created: u64) -> JobState {
    JobState::new(id.to_string(), spec(), Timestamp(created))
}

/// Sets the job's reason to `to`: a change that is not idempotent to apply twice by accident.
async fn set_reason(jobs: &Jobs, id: &str, to: &str) -> anyhow::Result<Option<Job>> {
    let r = jobs
        .update(id, |j| {
            let mut n = j.clone();
            n.intent.reason = Some(to.to_string());
            Some((n, ()))
        })
        .await?;
    Ok(r.map(|(j, ())| j))
}

async fn stored(store: &dyn Store, id: &str) -> Intent {
    let v = store.get(&format!("jobs/{id}")).await.unwrap().unwrap();
    serde_json::from_slice(&v.value).unwrap()
}

/// Another writer renames the job to "renamed elsewhere", behind the view's back.
async fn rename_elsewhere(store: &dyn Store, id: &str) {
    let mut other = stored(store, id).await;
    other.name = "renamed elsewhere".into();
    let value = serde_json::to_vec(&other).unwrap();
    store
        .put(&format!("jobs/{id}"), value, Precondition::Any)
        .await
        .unwrap();
}

/// A write that committed but whose answer was lost is reported as done, and the next writes of
/// that job succeed (before: every later compare-and-swap on the job conflicted forever).
async fn committed_but_timed_out_write(b: Backend) {
    let faulty = FaultyStore::new(b.store.clone());
    let jobs = Jobs::load(faulty.clone()).await.unwrap();
    jobs.create(new_job("job1", 1)).await.unwrap();

    faulty.arm("jobs/job1", Fault::CommitThenTimeout);
    let j = set_reason(&jobs, "job1", "first").await.unwrap().unwrap();
    assert_eq!(j.reason.as_deref(), Some("first"));
    assert_eq!(faulty.injected(), 1);
    set_reason(&jobs, "job1", "second").await.unwrap().unwrap();
    assert_eq!(
        stored(&*b.store, "job1").await.reason.as_deref(),
        Some("second")
    );

    // The answer is lost and the read-back fails too: the write is reported failed, and the
    // next write re-reads the job instead of conflicting.
    faulty.arm("jobs/job1", Fault::CommitThenTimeoutAndUnreadable);
    assert!(set_reason(&jobs, "job1", "third").await.is_err());
    let j = set_reason(&jobs, "job1", "fourth").await.unwrap().unwrap();
    assert_eq!(j.reason.as_deref(), Some("fourth"));
    assert_eq!(
        stored(&*b.store, "job1").await.reason.as_deref(),
        Some("fourth")
    );
    assert_eq!(jobs.get("job1").unwrap().reason.as_deref(), Some("fourth"));

    // A write that failed outright changes nothing, and the next one goes through.
    faulty.arm("jobs/job1", Fault::Fail);
    assert!(set_reason(&jobs, "job1", "fifth").await.is_err());
    assert_eq!(
        stored(&*b.store, "job1").await.reason.as_deref(),
        Some("fourth")
    );
    set_reason(&jobs, "job1", "sixth").await.unwrap().unwrap();
    assert_eq!(faulty.pending(), 0);
}

/// Another writer changed the job first: the change is applied again to the fresh record, so
/// both writers' changes survive.
async fn conflict_re_reads_and_retries(b: Backend) {
    let faulty = FaultyStore::new(b.store.clone());
    let jobs = Jobs::load(faulty.clone()).await.unwrap();
    jobs.create(new_job("job1", 1)).await.unwrap();

    // Someone else renames the job behind this controller's back...
    rename_elsewhere(&*b.store, "job1").await;
    // ...and another write gets in first during the next update as well.
    faulty.arm("jobs/job1", Fault::OtherWriterFirst);
    let mut calls = 0;
    let (j, ()) = jobs
        .update("job1", |j| {
            calls += 1;
            let mut n = j.clone();
            n.intent.reason = Some("mine".into());
            Some((n, ()))
        })
        .await
        .unwrap()
        .unwrap();
    assert!(
        calls >= 2,
        "the change was applied again after the conflict"
    );
    assert_eq!(j.name, "renamed elsewhere");
    assert_eq!(j.reason.as_deref(), Some("mine"));
    let s = stored(&*b.store, "job1").await;
    assert_eq!(
        (s.name.as_str(), s.reason.as_deref()),
        ("renamed elsewhere", Some("mine"))
    );
}

/// Changes and deletions made by another writer reach the view through the watch.
async fn view_follows_the_store(b: Backend) {
    let jobs = Jobs::load(b.store.clone()).await.unwrap();
    let cancel = CancellationToken::new();
    let follow = tokio::spawn(jobs.clone().follow(cancel.clone()));
    jobs.create(new_job("job1", 1)).await.unwrap();

    let mut other = stored(&*b.store, "job1").await;
    other.reason = Some("written by another controller".into());
    b.store
        .put(
            "jobs/job1",
            serde_json::to_vec(&other).unwrap(),
            Precondition::Any,
        )
        .await
        .unwrap();
    let mut created = new_job("job2", 2).intent;
    created.status = JobStatus::Succeeded;
    b.store
        .put(
            "jobs/job2",
            serde_json::to_vec(&created).unwrap(),
            Precondition::Absent,
        )
        .await
        .unwrap();
    eventually(
        WAIT,
        "the view takes the other writer's changes",
        || async {
            let seen = jobs.get("job1")?.reason == other.reason && jobs.get("job2").is_some();
            seen.then_some(())
        },
    )
    .await
    .unwrap();
    // Its own next write builds on what the other writer stored.
    set_reason(&jobs, "job1", "mine").await.unwrap().unwrap();

    b.store.delete("jobs/job2").await.unwrap();
    eventually(WAIT, "the view forgets a deleted job", || async {
        jobs.get("job2").is_none().then_some(())
    })
    .await
    .unwrap();
    assert_eq!(jobs.len(), 1);
    cancel.cancel();
    follow.await.unwrap();
}

/// A job whose writes keep failing is retried with backoff and does not hold up the others
/// (before: the pass aborted at the first failed action, for every job, on every pass).
async fn one_failing_job_does_not_stop_the_others(b: Backend) {
    let faulty = FaultyStore::new(b.store.clone());
    let jobs = Jobs::load(faulty.clone()).await.unwrap();
    let agents = Agents::load(faulty.clone(), Timestamp::now())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    agents
        .connect(
            AgentInfo {
                name: "a1".into(),
                connected: true,
                cpu_small_slots: 4,
                gpus: Vec::new(),
                cpus: 2,
                memory_bytes: 1 << 30,
                version: "test".into(),
                last_seen: Timestamp::now(),
                jobs: Vec::new(),
            },
            tx,
            agents.claim("a1").1,
        )
        .await;
    let ctl = Controller::new(
        jobs.clone(),
        agents,
        LogStore::open(b.dir.path().join("logs")).unwrap(),
        LogStore::open(b.dir.path().join("reports")).unwrap(),
        Arc::new(DirStore::open(b.dir.path().join("artifacts")).unwrap()),
        Duration::from_secs(30),
    );
    // The oldest job is planned first; its writes fail.
    jobs.create(new_job("job1", 1)).await.unwrap();
    jobs.create(new_job("job2", 2)).await.unwrap();
    faulty.break_key("jobs/job1");

    let failed = ctl.reconcile_once().await;
    assert_eq!(failed, 1);
    assert_eq!(jobs.get("job2").unwrap().status, JobStatus::Scheduled);
    assert_eq!(jobs.get("job1").unwrap().status, JobStatus::Pending);
    let retry = ctl.retry_of("job1").expect("job1 is in backoff");
    assert_eq!(retry.failures, 1);
    // Within its backoff the job is left alone: no new write is tried.
    let before = faulty.injected();
    assert_eq!(ctl.reconcile_once().await, 0);
    assert_eq!(faulty.injected(), before);

    faulty.heal("jobs/job1");
    eventually(
        WAIT,
        "job1 placed once its store writes work again",
        || async {
            ctl.reconcile_once().await;
            (jobs.get("job1")?.status == JobStatus::Scheduled).then_some(())
        },
    )
    .await
    .unwrap();
    assert!(ctl.retry_of("job1").is_none());
    let mut assigned = Vec::new();
    while let Ok(m) = rx.try_recv() {
        assigned.push(format!("{m:?}"));
    }
    assert_eq!(assigned.len(), 2, "{assigned:?}");
}

/// Many jobs are written in one transaction; a batch that meets another writer's change falls
/// back to one update per job, and every job still gets its change.
async fn batched_updates(b: Backend) {
    let faulty = FaultyStore::new(b.store.clone());
    let jobs = Jobs::load(faulty.clone()).await.unwrap();
    let ids: Vec<String> = (0..5).map(|i| format!("job{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        jobs.create(new_job(id, i as u64)).await.unwrap();
    }
    let reason = |to: &'static str| {
        move |j: &JobState| {
            let mut n = j.clone();
            n.intent.reason = Some(to.into());
            Some((n, ()))
        }
    };
    let before = faulty.writes();
    let results = jobs.update_many(&ids, reason("one")).await;
    assert!(results.iter().all(|r| matches!(r, Ok(Some(_)))));
    let after = faulty.writes();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "one transaction"
    );
    for id in &ids {
        assert_eq!(stored(&*b.store, id).await.reason.as_deref(), Some("one"));
    }

    rename_elsewhere(&*b.store, "job3").await;
    let results = jobs.update_many(&ids, reason("two")).await;
    assert!(results.iter().all(|r| matches!(r, Ok(Some(_)))));
    for id in &ids {
        assert_eq!(stored(&*b.store, id).await.reason.as_deref(), Some("two"));
    }
    assert_eq!(stored(&*b.store, "job3").await.name, "renamed elsewhere");
    // Declined and unknown jobs are left alone.
    let results = jobs
        .update_many(&["job0".to_string(), "nope".to_string()], |_| {
            None::<(JobState, ())>
        })
        .await;
    assert!(results.iter().all(|r| matches!(r, Ok(None))));
}

/// Finished jobs beyond the recent ones leave memory and are still listed, filtered and read.
async fn history_is_read_from_the_store(b: Backend) {
    const N: usize = runyard_controller::jobs::RECENT_FINISHED + 300;
    for i in 0..N {
        let mut j = new_job(&format!("job{i:05}"), i as u64).intent;
        j.status = if i % 3 == 0 {
            JobStatus::Failed
        } else {
            JobStatus::Succeeded
        };
        b.store
            .put(
                &format!("jobs/{}", j.id),
                serde_json::to_vec(&j).unwrap(),
                Precondition::Absent,
            )
            .await
            .unwrap();
    }
    b.store
        .put(
            "jobs/job99999",
            serde_json::to_vec(&new_job("job99999", 1_000_000).intent).unwrap(),
            Precondition::Absent,
        )
        .await
        .unwrap();
    let jobs = Jobs::load(b.store.clone()).await.unwrap();
    assert_eq!(jobs.len(), N + 1);
    // Loaded from the store: only the active job's record is in memory.
    assert!(jobs.get("job00000").is_none());
    assert_eq!(jobs.active().len(), 1);
    let old = jobs.fetch("job00000").await.unwrap().unwrap();
    assert_eq!(old.status, JobStatus::Failed);
    assert!(jobs.fetch("nope").await.unwrap().is_none());

    // Every failed job, newest first, in pages of 100.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, more) = jobs
            .page(cursor.as_deref(), 100, |s| s == JobStatus::Failed)
            .await
            .unwrap();
        assert!(page.iter().all(|j| j.status == JobStatus::Failed));
        seen.extend(page.iter().map(|j| j.id.clone()));
        cursor = page.last().map(|j| j.id.clone());
        if !more {
            break;
        }
    }
    let want: Vec<String> = (0..N)
        .rev()
        .filter(|i| i % 3 == 0)
        .map(|i| format!("job{i:05}"))
        .collect();
    assert_eq!(seen, want);
}

/// The version of a key in the store.
async fn version_of(store: &dyn Store, key: &str) -> Option<u64> {
    store.get(key).await.unwrap().map(|v| v.version)
}

/// Places `job1` on agent `x` as attempt 1 through the view (intent and placement in one
/// transaction).
async fn place_job1(jobs: &Jobs) -> Job {
    let (j, ()) = jobs
        .update("job1", |s| {
            let action = runyard_controller::reconcile::Action::Place {
                job: "job1".into(),
                attempt: 1,
                agent: "x".into(),
                gpus: vec![],
            };
            runyard_controller::reconcile::apply(s, &action, Timestamp(5)).map(|n| (n, ()))
        })
        .await
        .unwrap()
        .unwrap();
    j
}

/// A job is two kinds of record: its intent and its placements. A report touches the placement
/// alone, a status both in one transaction, a write whose answer is lost settles both, and a
/// delete removes both.
async fn intent_and_placement_are_stored_apart(b: Backend) {
    let faulty = FaultyStore::new(b.store.clone());
    let jobs = Jobs::load(faulty.clone()).await.unwrap();
    jobs.create(new_job("job1", 1)).await.unwrap();
    assert_eq!(
        version_of(&*b.store, "placements/job1/0000000001").await,
        None
    );
    let before = faulty.writes();
    let placed = place_job1(&jobs).await;
    let after = faulty.writes();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "one transaction"
    );
    assert_eq!(
        (placed.status, placed.agent.as_deref()),
        (JobStatus::Scheduled, Some("x"))
    );
    let intent_v = version_of(&*b.store, "jobs/job1").await.unwrap();
    let placement_v = version_of(&*b.store, "placements/job1/0000000001")
        .await
        .unwrap();

    // A report: the placement alone is rewritten.
    let (j, ()) = jobs
        .update("job1", |s| {
            let mut n = s.clone();
            n.placement.as_mut()?.metrics.insert("loss".into(), 0.5);
            Some((n, ()))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.metrics["loss"], 0.5);
    assert_eq!(
        version_of(&*b.store, "jobs/job1").await,
        Some(intent_v),
        "the intent is untouched"
    );
    assert!(
        version_of(&*b.store, "placements/job1/0000000001")
            .await
            .unwrap()
            > placement_v
    );
    let stored_intent =
        String::from_utf8(b.store.get("jobs/job1").await.unwrap().unwrap().value).unwrap();
    assert!(!stored_intent.contains("loss"), "{stored_intent}");

    // The attempt succeeds: both records, and the answer of that transaction is lost.
    faulty.arm("placements/job1/0000000001", Fault::CommitThenTimeout);
    let done = runyard_model::AttemptStatus {
        state: runyard_model::AttemptState::Succeeded,
        exit_code: Some(0),
        ..runyard_model::AttemptStatus::preparing(1)
    };
    let (j, reply) = jobs
        .update("job1", |s| {
            let (n, reply) = runyard_controller::reconcile::on_status(s, &done, "x", Timestamp(9));
            n.map(|n| (n, reply))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(faulty.injected(), 1);
    assert_eq!(
        (j.status, reply),
        (
            JobStatus::Succeeded,
            runyard_controller::reconcile::Reply::Release
        )
    );
    let p: runyard_model::Placement = serde_json::from_slice(
        &b.store
            .get("placements/job1/0000000001")
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(
        (p.status, p.exit_code, p.metrics["loss"]),
        (JobStatus::Succeeded, Some(0), 0.5)
    );
    assert_eq!(stored(&*b.store, "job1").await.status, JobStatus::Succeeded);
    // The next write builds on it (no conflict with a version the view never saw).
    set_reason(&jobs, "job1", "done").await.unwrap().unwrap();
    assert_eq!(jobs.placements("job1").await.unwrap().unwrap(), vec![p]);

    // A fresh view composes the same job from the two records.
    let again = Jobs::load(b.store.clone()).await.unwrap();
    let fetched = again.fetch("job1").await.unwrap().unwrap();
    assert_eq!(fetched, jobs.get("job1").unwrap());

    jobs.remove("job1").await.unwrap().unwrap();
    assert_eq!(version_of(&*b.store, "jobs/job1").await, None);
    assert!(b.store.list("placements/job1/").await.unwrap().is_empty());
}

/// A store written by an earlier version (one flat record per job, schema version 1) loads as
/// it was, and each job is stored as an intent and a placement on its next write.
async fn version_1_records_load_and_are_split_on_write(b: Backend) {
    let old = serde_json::json!({
        "schema_version": 1,
        "id": "job1", "name": "old", "status": "running", "desired": "run",
        "spec": {"repo": "file:///r", "script": "t.py", "compute": "cpu-small"},
        "attempt": 2, "agent": "x", "gpus": [], "commit": "abc", "exit_code": null,
        "reason": null, "failure": null, "lost_count": 1, "failures": 0,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:01:00Z",
        "scheduled_at": "2026-01-01T00:00:10Z", "started_at": "2026-01-01T00:00:20Z",
        "finished_at": null, "progress": null, "metrics": {"loss": 0.25},
        "best": null, "best_callback": null, "environment": null, "report_offset": 120,
        "placements": [{"attempt": 1, "agent": "w"}, {"attempt": 2, "agent": "x"}]
    });
    b.store
        .put(
            "jobs/job1",
            serde_json::to_vec(&old).unwrap(),
            Precondition::Absent,
        )
        .await
        .unwrap();
    let jobs = Jobs::load(b.store.clone()).await.unwrap();
    let j = jobs.get("job1").unwrap();
    assert_eq!(
        (
            j.status,
            j.attempt,
            j.agent.as_deref(),
            j.commit.as_deref(),
            j.metrics["loss"],
            j.report_offset
        ),
        (JobStatus::Running, 2, Some("x"), Some("abc"), 0.25, 120)
    );
    assert_eq!((j.placed_on(1), j.placed_on(2)), (Some("w"), Some("x")));
    assert_eq!(j.lost_count, 1);

    set_reason(&jobs, "job1", "upgraded")
        .await
        .unwrap()
        .unwrap();
    let intent = stored(&*b.store, "job1").await;
    assert_eq!(
        intent.schema_version,
        runyard_model::intent::INTENT_SCHEMA_VERSION
    );
    let raw = String::from_utf8(b.store.get("jobs/job1").await.unwrap().unwrap().value).unwrap();
    assert!(
        !raw.contains("metrics"),
        "the intent holds no placement: {raw}"
    );
    let p: runyard_model::Placement = serde_json::from_slice(
        &b.store
            .get("placements/job1/0000000002")
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(
        (
            p.agent.as_str(),
            p.status,
            p.commit.as_deref(),
            p.report_offset
        ),
        ("x", JobStatus::Running, Some("abc"), 120)
    );
    let fresh = Jobs::load(b.store.clone())
        .await
        .unwrap()
        .get("job1")
        .unwrap();
    assert_eq!(
        (fresh.agent.as_deref(), fresh.metrics["loss"]),
        (Some("x"), 0.25)
    );
    assert_eq!(fresh.reason.as_deref(), Some("upgraded"));
}

/// Another writer places a job (intent and placement in one transaction): the view, which
/// watches the two prefixes apart, ends up with both.
async fn view_follows_another_writers_placement(b: Backend) {
    let jobs = Jobs::load(b.store.clone()).await.unwrap();
    let cancel = CancellationToken::new();
    let follow = tokio::spawn(jobs.clone().follow(cancel.clone()));
    jobs.create(new_job("job1", 1)).await.unwrap();
    let v = version_of(&*b.store, "jobs/job1").await.unwrap();
    let mut other = new_job("job1", 1);
    let action = runyard_controller::reconcile::Action::Place {
        job: "job1".into(),
        attempt: 1,
        agent: "elsewhere".into(),
        gpus: vec![3],
    };
    other = runyard_controller::reconcile::apply(&other, &action, Timestamp(5)).unwrap();
    b.store
        .put_all(vec![
            (
                "jobs/job1".into(),
                serde_json::to_vec(&other.intent).unwrap(),
                Precondition::Version(v),
            ),
            (
                "placements/job1/0000000001".into(),
                serde_json::to_vec(other.placement.as_ref().unwrap()).unwrap(),
                Precondition::Absent,
            ),
        ])
        .await
        .unwrap();
    eventually(WAIT, "the view takes both records", || async {
        let j = jobs.get("job1")?;
        (j.agent.as_deref() == Some("elsewhere") && j.gpus == [3]).then_some(())
    })
    .await
    .unwrap();
    let states = jobs.active_states();
    assert!(!states[0].is_incomplete());
    cancel.cancel();
    follow.await.unwrap();
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(
                #[tokio::test]
                async fn $name() {
                    runyard_tests::init_tracing();
                    let case = super::$name(super::Backend::file().await);
                    tokio::time::timeout(super::CASE_DEADLINE, case).await.expect("case deadline");
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    runyard_tests::init_tracing();
                    let case = super::$name(super::Backend::etcd().await);
                    tokio::time::timeout(super::CASE_DEADLINE, case).await.expect("case deadline");
                }
            )*
        }
    };
}

on_both_stores!(
    committed_but_timed_out_write,
    conflict_re_reads_and_retries,
    view_follows_the_store,
    one_failing_job_does_not_stop_the_others,
    batched_updates,
    history_is_read_from_the_store,
    intent_and_placement_are_stored_apart,
    version_1_records_load_and_are_split_on_write,
    view_follows_another_writers_placement,
);
