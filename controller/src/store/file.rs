//! Embedded store: one redb file holding key -> (version, bytes), for a single controller.
//! Invariants: every write is committed durably before it returns; versions come from one
//! persisted counter, so they strictly increase per key across delete and re-create and
//! restarts; watchers receive changes in commit order (writes are serialized and broadcast
//! before the next write starts); the file lock keeps a second process out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tracing::info;

use super::{Precondition, Store, StoreError, Versioned, WatchEvent, WatchStream};

/// key -> (version, value).
const ENTRIES: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("entries");
/// Store-wide bookkeeping; holds [`LAST_VERSION`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The highest version ever handed out.
const LAST_VERSION: &str = "last_version";
/// Changes buffered per watcher before it is told it fell behind.
const WATCH_BUFFER: usize = 4096;
/// Writes one `put_all` takes (one transaction, one fsync).
const MAX_BATCH: usize = 10_000;
/// redb's page cache. Its default (1 GiB) would keep the whole history in memory once listed;
/// the controller's hot set (active and recent jobs, agents) is far smaller.
const CACHE_BYTES: usize = 32 << 20;

/// The embedded [`Store`]; cheap to clone, all clones share one open database.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Serializes writes so that broadcast order is commit order.
    writer: Mutex<()>,
    events: broadcast::Sender<WatchEvent>,
}

enum Outcome<T> {
    Done(T),
    /// A precondition failed for this key; nothing was written.
    Conflict(String),
}

impl FileStore {
    /// Opens (or creates) the store file, creating its parent directory.
    /// [`StoreError::InUse`] when another process has it open.
    pub async fn open(path: &Path) -> Result<FileStore, StoreError> {
        let path = path.to_path_buf();
        let store = blocking(move || open_blocking(path, WATCH_BUFFER)).await??;
        info!(store = "file", path = %store.inner.path.display(), "store opened");
        Ok(store)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Writes many keys in one durable transaction (bulk loads: imports, benchmarks); each key
    /// gets a new version as with `put(.., Precondition::Any)`, and watchers see every write.
    pub async fn put_many(&self, entries: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let writes = entries
            .into_iter()
            .map(|(k, v)| (k, v, Precondition::Any))
            .collect();
        self.put_all(writes).await.map(|_| ())
    }
}

fn open_blocking(path: PathBuf, watch_buffer: usize) -> Result<FileStore, StoreError> {
    let open_err = |source: redb::Error| StoreError::Open {
        path: path.clone(),
        source: source.into(),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: e.into(),
        })?;
    }
    let db = match Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
    {
        Ok(db) => db,
        // LockProtocolMismatch: open in another process running a different redb version.
        Err(DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch) => {
            return Err(StoreError::InUse { path });
        }
        Err(e) => return Err(open_err(e.into())),
    };
    // Create both tables so that readers never meet a missing one.
    let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
    txn.open_table(ENTRIES).map_err(|e| open_err(e.into()))?;
    txn.open_table(META).map_err(|e| open_err(e.into()))?;
    txn.commit().map_err(|e| open_err(e.into()))?;
    let (events, _) = broadcast::channel(watch_buffer);
    Ok(FileStore {
        inner: Arc::new(Inner {
            db,
            path,
            writer: Mutex::new(()),
            events,
        }),
    })
}

/// Runs redb work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StoreError::Cancelled),
    }
}

fn read_err(key: &str) -> impl FnOnce(redb::Error) -> StoreError + '_ {
    move |e| match e {
        redb::Error::Corrupted(reason) => StoreError::Corrupt {
            key: key.to_string(),
            reason,
        },
        e => StoreError::Read {
            key: key.to_string(),
            source: e.into(),
        },
    }
}

fn write_err(key: &str) -> impl FnOnce(redb::Error) -> StoreError + '_ {
    move |e| match e {
        redb::Error::Corrupted(reason) => StoreError::Corrupt {
            key: key.to_string(),
            reason,
        },
        e => StoreError::Write {
            key: key.to_string(),
            source: e.into(),
        },
    }
}

impl Inner {
    fn get(&self, key: &str) -> Result<Option<Versioned>, redb::Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        Ok(table.get(key)?.map(|g| {
            let (version, value) = g.value();
            Versioned {
                value: value.to_vec(),
                version,
            }
        }))
    }

    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, redb::Error> {
        use std::ops::Bound;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        for item in table.range::<&str>((start, Bound::Unbounded))? {
            let (k, v) = item?;
            let key = k.value();
            if !key.starts_with(prefix) || out.len() >= limit {
                break;
            }
            let (version, value) = v.value();
            out.push((
                key.to_string(),
                Versioned {
                    value: value.to_vec(),
                    version,
                },
            ));
        }
        Ok(out)
    }

    /// Writes every entry in one transaction if every precondition holds; else writes nothing
    /// and names the first key whose precondition failed.
    fn put_all(
        &self,
        writes: Vec<(String, Vec<u8>, Precondition)>,
    ) -> Result<Outcome<Vec<u64>>, redb::Error> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = self.db.begin_write()?;
        let mut events = Vec::with_capacity(writes.len());
        let mut versions = Vec::with_capacity(writes.len());
        let conflict = {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut meta = txn.open_table(META)?;
            let mut version = meta.get(LAST_VERSION)?.map_or(0, |g| g.value());
            let mut conflict = None;
            for (key, value, pre) in writes {
                let current = entries.get(key.as_str())?.map(|g| g.value().0);
                let allowed = match (pre, current) {
                    (Precondition::Any, _) | (Precondition::Absent, None) => true,
                    (Precondition::Version(want), Some(have)) => want == have,
                    (Precondition::Absent, Some(_)) | (Precondition::Version(_), None) => false,
                };
                if !allowed {
                    conflict = Some(key);
                    break;
                }
                version += 1;
                entries.insert(key.as_str(), (version, value.as_slice()))?;
                versions.push(version);
                events.push(WatchEvent::Put {
                    key,
                    value: Versioned { value, version },
                });
            }
            if conflict.is_none() {
                meta.insert(LAST_VERSION, version)?;
            }
            conflict
        };
        if let Some(key) = conflict {
            txn.abort()?;
            return Ok(Outcome::Conflict(key));
        }
        txn.commit()?;
        // No receivers is fine: nobody is watching.
        for e in events {
            let _ = self.events.send(e);
        }
        Ok(Outcome::Done(versions))
    }

    fn delete(&self, key: String) -> Result<(), redb::Error> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(ENTRIES)?.remove(key.as_str())?.is_some();
        if !existed {
            txn.abort()?;
            return Ok(());
        }
        txn.commit()?;
        let _ = self.events.send(WatchEvent::Delete { key });
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let inner = self.inner.clone();
        let k = key.to_string();
        blocking(move || inner.get(&k))
            .await?
            .map_err(read_err(key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let inner = self.inner.clone();
        let p = prefix.to_string();
        blocking(move || inner.list(&p, None, usize::MAX))
            .await?
            .map_err(read_err(prefix))
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        let inner = self.inner.clone();
        let p = prefix.to_string();
        let a = after.map(str::to_string);
        blocking(move || inner.list(&p, a.as_deref(), limit))
            .await?
            .map_err(read_err(prefix))
    }

    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<u64, StoreError> {
        let versions = self.put_all(vec![(key.to_string(), value, pre)]).await?;
        Ok(versions[0])
    }

    async fn put_all(
        &self,
        writes: Vec<(String, Vec<u8>, Precondition)>,
    ) -> Result<Vec<u64>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let first = writes[0].0.clone();
        let inner = self.inner.clone();
        match blocking(move || inner.put_all(writes))
            .await?
            .map_err(write_err(&first))?
        {
            Outcome::Done(versions) => Ok(versions),
            Outcome::Conflict(key) => Err(StoreError::Conflict { key }),
        }
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let k = key.to_string();
        blocking(move || inner.delete(k))
            .await?
            .map_err(write_err(key))
    }

    fn watch(&self, prefix: &str) -> WatchStream {
        // Subscribed before returning: nothing committed after this call is missed.
        let mut rx = self.inner.events.subscribe();
        let prefix = prefix.to_string();
        async_stream::stream! {
            loop {
                match rx.recv().await {
                    Ok(event) if event.key().starts_with(&prefix) => yield Ok(event),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        yield Err(StoreError::WatchGap {
                            prefix: prefix.clone(),
                            reason: format!("fell {missed} changes behind"),
                        });
                        break;
                    }
                    // The store was dropped.
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        .boxed()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn next(w: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch event within 5s")
            .expect("watch stream open")
            .expect("watch event ok")
    }

    #[tokio::test]
    async fn put_many_writes_every_key_with_new_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("s.redb")).await.unwrap();
        let v0 = store
            .put("a", b"0".to_vec(), Precondition::Any)
            .await
            .unwrap();
        let mut w = store.watch("");
        store
            .put_many(vec![
                ("a".into(), b"1".to_vec()),
                ("b".into(), b"2".to_vec()),
            ])
            .await
            .unwrap();
        let a = store.get("a").await.unwrap().unwrap();
        let b = store.get("b").await.unwrap().unwrap();
        assert_eq!(
            (a.value.as_slice(), b.value.as_slice()),
            (&b"1"[..], &b"2"[..])
        );
        assert!(v0 < a.version && a.version < b.version);
        assert_eq!(next(&mut w).await.key(), "a");
        assert_eq!(next(&mut w).await.key(), "b");
        let v = store.put("c", vec![], Precondition::Any).await.unwrap();
        assert!(v > b.version);
    }

    #[tokio::test]
    async fn versions_keep_increasing_across_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.redb");
        let store = FileStore::open(&path).await.unwrap();
        let v1 = store
            .put("k", b"a".to_vec(), Precondition::Any)
            .await
            .unwrap();
        store.delete("k").await.unwrap();
        let v2 = store
            .put("k", b"b".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        assert!(v2 > v1);
        drop(store);
        let store = FileStore::open(&path).await.unwrap();
        let v3 = store
            .put("k", b"c".to_vec(), Precondition::Version(v2))
            .await
            .unwrap();
        assert!(v3 > v2);
        assert_eq!(
            store.get("k").await.unwrap(),
            Some(Versioned {
                value: b"c".to_vec(),
                version: v3
            })
        );
    }

    #[tokio::test]
    async fn conflict_changes_nothing_and_emits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("s.redb")).await.unwrap();
        let v = store
            .put("k", b"a".to_vec(), Precondition::Any)
            .await
            .unwrap();
        let mut w = store.watch("");
        let err = store
            .put("k", b"x".to_vec(), Precondition::Version(v + 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { ref key } if key == "k"),
            "{err:?}"
        );
        // A later successful write must be the first event and get the next version.
        let v2 = store
            .put("k", b"b".to_vec(), Precondition::Version(v))
            .await
            .unwrap();
        assert_eq!(v2, v + 1);
        assert_eq!(
            next(&mut w).await,
            WatchEvent::Put {
                key: "k".into(),
                value: Versioned {
                    value: b"b".to_vec(),
                    version: v2
                }
            }
        );
    }

    #[tokio::test]
    async fn deleting_an_absent_key_emits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("s.redb")).await.unwrap();
        let mut w = store.watch("");
        store.delete("missing").await.unwrap();
        store.put("k", vec![], Precondition::Any).await.unwrap();
        assert_eq!(next(&mut w).await.key(), "k");
    }

    #[tokio::test]
    async fn slow_watcher_gets_a_gap_error_then_the_end() {
        const BUFFER: usize = 4;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = blocking(move || open_blocking(path, BUFFER))
            .await
            .unwrap()
            .unwrap();
        let mut w = store.watch("");
        for i in 0..=BUFFER {
            store
                .put(&format!("k{i}"), vec![], Precondition::Any)
                .await
                .unwrap();
        }
        let first = w.next().await.unwrap();
        assert!(
            matches!(first, Err(StoreError::WatchGap { .. })),
            "{first:?}"
        );
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_store_ends_watches() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("s.redb")).await.unwrap();
        let mut w = store.watch("");
        drop(store);
        let end = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[tokio::test]
    async fn second_open_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = FileStore::open(&path).await.unwrap();
        let err = FileStore::open(&path)
            .await
            .err()
            .expect("second open fails");
        assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
        assert!(err.to_string().contains("data dir in use"), "{err}");
        drop(store);
        FileStore::open(&path)
            .await
            .expect("open after the first closed");
    }
}
