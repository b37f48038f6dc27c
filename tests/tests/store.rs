//! Store conformance: one suite of behaviours, run against the embedded file store and against a
//! real etcd, both opened through `store::open` with the URLs users pass to `--store`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use runyard_controller::store::{self, Precondition, Store, StoreError, Versioned, WatchEvent};
use runyard_tests::etcd::EtcdServer;

/// Longest wait for one watch event.
const EVENT_WAIT: Duration = Duration::from_secs(10);
/// Longest run of one conformance case, so that a store bug cannot hang the suite.
const CASE_DEADLINE: Duration = Duration::from_secs(120);

/// A store backend under test, with what it needs to be opened again.
enum Backend {
    File {
        data_dir: tempfile::TempDir,
    },
    Etcd {
        server: EtcdServer,
        data_dir: tempfile::TempDir,
    },
}

impl Backend {
    async fn file() -> Backend {
        Backend::File {
            data_dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn etcd() -> Backend {
        Backend::Etcd {
            server: EtcdServer::start().await.expect("start etcd"),
            data_dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::File { .. } => "file:".to_string(),
            Backend::Etcd { server, .. } => server.url(),
        }
    }

    fn data_dir(&self) -> &Path {
        match self {
            Backend::File { data_dir } | Backend::Etcd { data_dir, .. } => data_dir.path(),
        }
    }

    /// A new handle: a new database open for the file store, a new client for etcd.
    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url(), self.data_dir())
            .await
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url()))
    }
}

fn put_event(key: &str, value: &[u8], version: u64) -> WatchEvent {
    WatchEvent::Put {
        key: key.to_string(),
        value: Versioned {
            value: value.to_vec(),
            version,
        },
    }
}

async fn next_event(w: &mut store::WatchStream) -> WatchEvent {
    tokio::time::timeout(EVENT_WAIT, w.next())
        .await
        .expect("watch event in time")
        .expect("watch stream still open")
        .expect("watch event, not an error")
}

fn assert_conflict(result: Result<u64, StoreError>, key: &str) {
    match result {
        Err(StoreError::Conflict { key: k }) if k == key => {}
        other => panic!("expected a conflict on {key}, got {other:?}"),
    }
}

async fn put_then_get(b: Backend) {
    let s = b.open().await;
    assert_eq!(s.get("jobs/a").await.unwrap(), None);
    let v1 = s
        .put("jobs/a", b"{\"x\":1}".to_vec(), Precondition::Any)
        .await
        .unwrap();
    assert!(v1 > 0);
    assert_eq!(
        s.get("jobs/a").await.unwrap(),
        Some(Versioned {
            value: b"{\"x\":1}".to_vec(),
            version: v1
        })
    );
    // Opaque bytes, empty included.
    let bytes = vec![0u8, 0xff, 0xfe, b'\n', 0];
    let v2 = s
        .put("jobs/a", bytes.clone(), Precondition::Any)
        .await
        .unwrap();
    assert!(v2 > v1);
    assert_eq!(s.get("jobs/a").await.unwrap().unwrap().value, bytes);
    let v3 = s
        .put("jobs/a", Vec::new(), Precondition::Any)
        .await
        .unwrap();
    assert!(v3 > v2);
    assert_eq!(
        s.get("jobs/a").await.unwrap(),
        Some(Versioned {
            value: Vec::new(),
            version: v3
        })
    );
    assert!(matches!(s.kind(), "file" | "etcd"));
}

async fn compare_and_swap(b: Backend) {
    let s = b.open().await;
    let v1 = s
        .put("k", b"one".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_conflict(s.put("k", b"x".to_vec(), Precondition::Absent).await, "k");
    assert_conflict(
        s.put("k", b"x".to_vec(), Precondition::Version(v1 + 1000))
            .await,
        "k",
    );
    assert_conflict(
        s.put("missing", b"x".to_vec(), Precondition::Version(v1))
            .await,
        "missing",
    );
    assert_eq!(s.get("missing").await.unwrap(), None);
    assert_eq!(
        s.get("k").await.unwrap(),
        Some(Versioned {
            value: b"one".to_vec(),
            version: v1
        }),
        "a failed precondition changes nothing"
    );
    let v2 = s
        .put("k", b"two".to_vec(), Precondition::Version(v1))
        .await
        .unwrap();
    assert!(v2 > v1);
    assert_conflict(
        s.put("k", b"x".to_vec(), Precondition::Version(v1)).await,
        "k",
    );
    // Re-created after a delete: a fresh create, and still a higher version.
    s.delete("k").await.unwrap();
    assert_conflict(
        s.put("k", b"x".to_vec(), Precondition::Version(v2)).await,
        "k",
    );
    let v3 = s
        .put("k", b"three".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert!(v3 > v2);
}

/// Many writers doing read-modify-write with CAS: no update is lost.
async fn concurrent_increments(b: Backend) {
    const WRITERS: usize = 4;
    const EACH: usize = 10;
    let s = b.open().await;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..EACH {
                loop {
                    let current = s.get("counter").await.unwrap();
                    let (n, pre) = match &current {
                        None => (0, Precondition::Absent),
                        Some(v) => (
                            String::from_utf8(v.value.clone())
                                .unwrap()
                                .parse::<usize>()
                                .unwrap(),
                            Precondition::Version(v.version),
                        ),
                    };
                    match s
                        .put("counter", (n + 1).to_string().into_bytes(), pre)
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = s.get("counter").await.unwrap().unwrap();
    assert_eq!(v.value, (WRITERS * EACH).to_string().into_bytes());
}

async fn list_by_prefix(b: Backend) {
    let s = b.open().await;
    for key in [
        "jobs/c", "jobs/a", "jobsx/a", "job", "agents/a", "jobs/b/1", "jobs/b", "zz", "jobs/ü",
    ] {
        s.put(key, key.as_bytes().to_vec(), Precondition::Any)
            .await
            .unwrap();
    }
    let listed = s.list("jobs/").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["jobs/a", "jobs/b", "jobs/b/1", "jobs/c", "jobs/ü"]);
    for (k, v) in &listed {
        assert_eq!(v.value, k.as_bytes());
        assert_eq!(s.get(k).await.unwrap().as_ref(), Some(v));
    }
    let all: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    assert_eq!(all.len(), 9);
    assert!(s.list("nothing/").await.unwrap().is_empty());
    assert_eq!(s.list("jobs/b/").await.unwrap().len(), 1);
}

/// More keys than one etcd list page, so paging is exercised too.
async fn list_many(b: Backend) {
    const N: usize = 1200;
    let s = b.open().await;
    let mut writes = futures::stream::iter(0..N)
        .map(|i| {
            let s = s.clone();
            async move {
                s.put(&format!("many/{i:05}"), vec![1], Precondition::Any)
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(32);
    while writes.next().await.is_some() {}
    s.put("manz", vec![], Precondition::Any).await.unwrap();
    let listed = s.list("many/").await.unwrap();
    let keys: Vec<String> = listed.into_iter().map(|(k, _)| k).collect();
    let want: Vec<String> = (0..N).map(|i| format!("many/{i:05}")).collect();
    assert_eq!(keys, want);
}

/// Paging through a prefix: every key once, in order, never a key of another prefix.
async fn list_in_pages(b: Backend) {
    let s = b.open().await;
    for key in [
        "job", "jobs/a", "jobs/b", "jobs/b/1", "jobs/c", "jobsx/a", "zz",
    ] {
        s.put(key, key.as_bytes().to_vec(), Precondition::Any)
            .await
            .unwrap();
    }
    for limit in [1, 2, 3, 10] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list_page("jobs/", after.as_deref(), limit).await.unwrap();
            assert!(page.len() <= limit, "limit {limit}: {page:?}");
            for (k, v) in &page {
                assert_eq!(v.value, k.as_bytes());
            }
            match page.last() {
                Some((k, _)) => after = Some(k.clone()),
                None => break,
            }
            seen.extend(page.into_iter().map(|(k, _)| k));
        }
        assert_eq!(
            seen,
            ["jobs/a", "jobs/b", "jobs/b/1", "jobs/c"],
            "limit {limit}"
        );
    }
    // A cursor before the prefix starts at its first key; one after it finds nothing.
    let first = s.list_page("jobs/", Some("a"), 1).await.unwrap();
    assert_eq!(first[0].0, "jobs/a");
    assert!(
        s.list_page("jobs/", Some("jobs/c"), 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.list_page("jobs/", None, 0).await.unwrap().is_empty());
}

/// Several compare-and-swap puts in one transaction: all or nothing.
async fn put_all_is_atomic(b: Backend) {
    let s = b.open().await;
    let va = s.put("a", b"a0".to_vec(), Precondition::Any).await.unwrap();
    assert!(s.max_batch() >= 100);
    let mut w = s.watch("");
    // One stale precondition: nothing is written, the conflict is reported.
    let err = s
        .put_all(vec![
            ("a".into(), b"a1".to_vec(), Precondition::Version(va)),
            ("b".into(), b"b1".to_vec(), Precondition::Absent),
            ("c".into(), b"c1".to_vec(), Precondition::Version(va + 1000)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(s.get("a").await.unwrap().unwrap().value, b"a0");
    assert!(s.get("b").await.unwrap().is_none());
    // All preconditions hold: every key is written, with versions above the old ones.
    let versions = s
        .put_all(vec![
            ("a".into(), b"a1".to_vec(), Precondition::Version(va)),
            ("b".into(), b"b1".to_vec(), Precondition::Absent),
            ("c".into(), b"c1".to_vec(), Precondition::Any),
        ])
        .await
        .unwrap();
    assert_eq!(versions.len(), 3);
    for ((key, value), version) in [("a", "a1"), ("b", "b1"), ("c", "c1")]
        .iter()
        .zip(&versions)
    {
        let got = s.get(key).await.unwrap().unwrap();
        assert_eq!(
            (got.value.as_slice(), got.version),
            (value.as_bytes(), *version)
        );
        assert!(*version > va);
        assert_eq!(
            next_event(&mut w).await,
            put_event(key, value.as_bytes(), *version)
        );
    }
    assert!(s.put_all(Vec::new()).await.unwrap().is_empty());
}

async fn delete(b: Backend) {
    let s = b.open().await;
    s.put("jobs/a", b"a".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.put("jobs/b", b"b".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.delete("jobs/a").await.unwrap();
    assert_eq!(s.get("jobs/a").await.unwrap(), None);
    let keys: Vec<String> = s
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["jobs/b"]);
    // Deleting what is not there is not an error.
    s.delete("jobs/a").await.unwrap();
    s.delete("never").await.unwrap();
}

async fn watch_sees_puts_and_deletes(b: Backend) {
    let s = b.open().await;
    s.put("jobs/old", b"before".to_vec(), Precondition::Any)
        .await
        .unwrap();
    let mut jobs = s.watch("jobs/");
    let mut agents = s.watch("agents/");
    let v1 = s
        .put("jobs/a", b"1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let va = s
        .put("agents/x", b"up".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.put("jobsx/n", b"neighbour".to_vec(), Precondition::Any)
        .await
        .unwrap();
    let v2 = s
        .put("jobs/a", b"2".to_vec(), Precondition::Version(v1))
        .await
        .unwrap();
    s.delete("jobs/a").await.unwrap();
    let v3 = s
        .put("jobs/b", b"3".to_vec(), Precondition::Any)
        .await
        .unwrap();

    assert_eq!(next_event(&mut jobs).await, put_event("jobs/a", b"1", v1));
    assert_eq!(next_event(&mut jobs).await, put_event("jobs/a", b"2", v2));
    assert_eq!(
        next_event(&mut jobs).await,
        WatchEvent::Delete {
            key: "jobs/a".into()
        }
    );
    assert_eq!(next_event(&mut jobs).await, put_event("jobs/b", b"3", v3));
    assert_eq!(
        next_event(&mut agents).await,
        put_event("agents/x", b"up", va)
    );
    // Nothing else is pending on either watch.
    let extra = tokio::time::timeout(Duration::from_millis(300), jobs.next()).await;
    assert!(extra.is_err(), "unexpected event {extra:?}");

    // A watch started on another handle sees writes made through this one.
    let other = b.open_second_handle().await;
    if let Some(other) = other {
        let mut w = other.watch("jobs/");
        let v4 = s
            .put("jobs/c", b"4".to_vec(), Precondition::Any)
            .await
            .unwrap();
        assert_eq!(next_event(&mut w).await, put_event("jobs/c", b"4", v4));
    }
}

impl Backend {
    /// A second concurrent handle: only etcd allows one (the file store is single-process).
    async fn open_second_handle(&self) -> Option<Arc<dyn Store>> {
        match self {
            Backend::File { .. } => None,
            Backend::Etcd { .. } => Some(self.open().await),
        }
    }
}

async fn reopen_keeps_data(b: Backend) {
    let s = b.open().await;
    let va = s
        .put("jobs/a", b"a".to_vec(), Precondition::Any)
        .await
        .unwrap();
    let vb = s
        .put("jobs/b", b"b".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.put("jobs/gone", b"x".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.delete("jobs/gone").await.unwrap();
    let before = s.list("").await.unwrap();
    drop(s);

    let s = b.open().await;
    assert_eq!(s.list("").await.unwrap(), before);
    assert_eq!(
        s.get("jobs/a").await.unwrap(),
        Some(Versioned {
            value: b"a".to_vec(),
            version: va
        })
    );
    // CAS against a version read before the reopen still works, and versions keep rising.
    let vb2 = s
        .put("jobs/b", b"b2".to_vec(), Precondition::Version(vb))
        .await
        .unwrap();
    assert!(vb2 > vb);
    let vg = s
        .put("jobs/gone", b"y".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert!(vg > vb2);
    if let Backend::File { data_dir } = &b {
        assert!(data_dir.path().join(store::DEFAULT_FILE_NAME).is_file());
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(
                #[tokio::test]
                async fn $name() {
                    let case = super::$name(super::Backend::file().await);
                    tokio::time::timeout(super::CASE_DEADLINE, case)
                        .await
                        .expect("case finished within the deadline");
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    let case = super::$name(super::Backend::etcd().await);
                    tokio::time::timeout(super::CASE_DEADLINE, case)
                        .await
                        .expect("case finished within the deadline");
                }
            )*
        }
    };
}

conformance!(
    put_then_get,
    compare_and_swap,
    concurrent_increments,
    list_by_prefix,
    list_many,
    list_in_pages,
    put_all_is_atomic,
    delete,
    watch_sees_puts_and_deletes,
    reopen_keeps_data,
);

/// Two etcd URLs with different prefixes on one cluster never see each other's keys.
#[tokio::test]
async fn etcd_prefixes_are_isolated() {
    let server = EtcdServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = store::open(&format!("{}/team-a", server.url()), dir.path())
        .await
        .unwrap();
    let b = store::open(&format!("{}/team-b", server.url()), dir.path())
        .await
        .unwrap();
    let mut wb = b.watch("");
    a.put("jobs/1", b"a".to_vec(), Precondition::Any)
        .await
        .unwrap();
    let vb = b
        .put("jobs/1", b"b".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(a.get("jobs/1").await.unwrap().unwrap().value, b"a");
    assert_eq!(b.get("jobs/1").await.unwrap().unwrap().value, b"b");
    assert_eq!(a.list("").await.unwrap().len(), 1);
    assert_eq!(next_event(&mut wb).await, put_event("jobs/1", b"b", vb));
}

/// Dropping the harness kills etcd and deletes its data.
#[tokio::test]
async fn etcd_harness_cleans_up() {
    let server = EtcdServer::start().await.unwrap();
    let dir = server.log_path().parent().unwrap().to_path_buf();
    let endpoint = server.endpoint.clone();
    assert!(dir.join("data").is_dir());
    drop(server);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        tokio::net::TcpStream::connect(&endpoint).await.is_err(),
        "etcd still listening on {endpoint}"
    );
}

const CHILD_DATA_DIR: &str = "RUNYARD_TEST_STORE_CHILD_DATA_DIR";

/// A second process opening the same store file gets a clear "data dir in use" error.
#[tokio::test]
async fn file_store_refuses_a_second_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = store::open("file:", dir.path()).await.unwrap();
    s.put("k", b"v".to_vec(), Precondition::Any).await.unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "second_process_open", "--nocapture"])
            .env(CHILD_DATA_DIR, dir.path())
            .output(),
    )
    .await
    .expect("child in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "child did not run: {stdout}");
    // The holder is unaffected.
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v");
}

/// Runs in the child process started by `file_store_refuses_a_second_process`.
#[tokio::test]
#[ignore = "child process of file_store_refuses_a_second_process"]
async fn second_process_open() {
    let dir = std::env::var_os(CHILD_DATA_DIR)
        .expect("run by file_store_refuses_a_second_process, which sets the data dir");
    let err = store::open("file:", Path::new(&dir))
        .await
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("data dir in use"), "{err}");
}
