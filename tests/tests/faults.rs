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
use runyard_model::{AgentInfo, Job, JobSpec, JobStatus, Timestamp};
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

fn new_job(id: &str, created: u64) -> Job {
    Job::new(id.to_string(), spec(), Timestamp(created))
}

/// Sets the job's reason to `to`: a change that is not idempotent to apply twice by accident.
async fn set_reason(jobs: &Jobs, id: &str, to: &str) -> anyhow::Result<Option<Job>> {
    let r = jobs
        .update(id, |j| {
            let mut n = j.clone();
            n.reason = Some(to.to_string());
            Some((n, ()))
        })
        .await?;
    Ok(r.map(|(j, ())| j))
}

async fn stored(store: &dyn Store, id: &str) -> Job {
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
            n.reason = Some("mine".into());
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
    let mut created = new_job("job2", 2);
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
        move |j: &Job| {
            let mut n = j.clone();
            n.reason = Some(to.into());
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
            None::<(Job, ())>
        })
        .await;
    assert!(results.iter().all(|r| matches!(r, Ok(None))));
}

/// Finished jobs beyond the recent ones leave memory and are still listed, filtered and read.
async fn history_is_read_from_the_store(b: Backend) {
    const N: usize = runyard_controller::jobs::RECENT_FINISHED + 300;
    for i in 0..N {
        let mut j = new_job(&format!("job{i:05}"), i as u64);
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
            serde_json::to_vec(&new_job("job99999", 1_000_000)).unwrap(),
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
);
