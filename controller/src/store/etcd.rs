//! etcd store: keys live under one prefix (default `/runyard/`) so several installations can
//! share a cluster. Invariants: a version is etcd's `mod_revision` of the key (store-wide,
//! strictly increasing); compare-and-swap is one etcd transaction comparing `mod_revision`
//! (`Absent`: `create_revision == 0`); lists are paged at one pinned revision, so they are one
//! snapshot; every call is bounded by a deadline, since an unreachable cluster otherwise waits
//! forever. A handle fenced by a leadership (`set_fence`) wraps every write in a transaction that
//! first compares the leader's election key: a deposed leader's writes fail with `Fenced` and
//! change nothing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, ResponseHeader,
    Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use tracing::info;

use super::{BoxError, Precondition, Store, StoreError, Versioned, WatchEvent, WatchStream};

/// Time allowed to reach the cluster when opening the store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one request once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Operations one etcd transaction may hold (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;
/// Keys fetched per page when listing.
const LIST_PAGE: i64 = 500;
/// HTTP/2 pings on idle connections so that a dead peer ends watches instead of hanging them.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The etcd [`Store`]; cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// Starts and ends with `/`.
    prefix: String,
    /// Highest store revision this handle has observed; watches start right after it.
    seen: Arc<AtomicU64>,
    /// The leadership every write must still hold (`leader::Fence`: the election key and its
    /// create revision); none: writes are not fenced.
    fence: Arc<std::sync::RwLock<Option<crate::leader::Fence>>>,
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`host:port`) and checks that it answers within
    /// `timeout`. `prefix` must start and end with `/` (see [`super::StoreUrl`]).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        let names = endpoints.join(",");
        let connect_err = |reason: String| StoreError::Connect {
            endpoints: names.clone(),
            reason,
        };
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(connect_err(format!(
                "key prefix {prefix:?} must start and end with /"
            )));
        }
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let mut client = bounded(timeout, Client::connect(urls, Some(options)))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        // The client connects lazily: one read proves the cluster answers, and gives the
        // revision that watches start after.
        let probe = bounded(
            timeout,
            client.get(prefix, Some(GetOptions::new().with_count_only())),
        )
        .await
        .map_err(|e| connect_err(e.to_string()))?;
        let store = EtcdStore {
            client,
            prefix: prefix.to_string(),
            seen: Arc::new(AtomicU64::new(0)),
            fence: Arc::default(),
        };
        store.observe(probe.header());
        info!(store = "etcd", endpoints = %names, prefix, "store connected");
        Ok(store)
    }

    /// Fences every later write of this handle (and its clones) with `fence`: a write commits
    /// only while that election key still exists with that create revision, so a controller
    /// that lost the leadership cannot change anything, even before it knows. `None` lifts it.
    pub fn set_fence(&self, fence: Option<crate::leader::Fence>) {
        *self.fence.write().unwrap_or_else(|e| e.into_inner()) = fence;
    }

    /// Commits `ops` if `compares` hold, as one transaction, inside the fence when one is set.
    /// Returns whether the compares held, and the revision.
    async fn commit(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        key: &str,
    ) -> Result<(bool, u64), StoreError> {
        let write_err = |source: BoxError| StoreError::Write {
            key: key.to_string(),
            source,
        };
        let fence = self.fence.read().unwrap_or_else(|e| e.into_inner()).clone();
        let inner = Txn::new().when(compares).and_then(ops);
        let mut client = self.client.clone();
        let Some(fence) = fence else {
            let resp = bounded(REQUEST_TIMEOUT, client.txn(inner))
                .await
                .map_err(write_err)?;
            self.observe(resp.header());
            return Ok((resp.succeeded(), revision(resp.header())));
        };
        let outer = Txn::new()
            .when([Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.revision,
            )])
            .and_then([TxnOp::txn(inner)]);
        let resp = bounded(REQUEST_TIMEOUT, client.txn(outer))
            .await
            .map_err(write_err)?;
        self.observe(resp.header());
        if !resp.succeeded() {
            return Err(StoreError::Fenced {
                key: key.to_string(),
            });
        }
        let held = resp.op_responses().into_iter().next().is_some_and(
            |r| matches!(r, etcd_client::TxnOpResponse::Txn(inner) if inner.succeeded()),
        );
        Ok((held, revision(resp.header())))
    }

    fn fenced(&self) -> bool {
        self.fence
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The key prefix inside etcd.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn observe(&self, header: Option<&ResponseHeader>) {
        if let Some(h) = header {
            self.seen
                .fetch_max(u64::try_from(h.revision()).unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// Awaits `fut` for at most `limit`.
async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(format!("no answer within {}s", limit.as_secs_f32()).into()),
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: no upper bound ("\0" means "to the end" for etcd).
    vec![0]
}

/// Strips the store prefix from an etcd key.
fn local_key(prefix: &str, kv: &KeyValue) -> Result<String, StoreError> {
    let raw = String::from_utf8_lossy(kv.key());
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: raw.to_string(),
        reason: reason.to_string(),
    };
    let key = std::str::from_utf8(kv.key()).map_err(|_| corrupt("key is not UTF-8"))?;
    key.strip_prefix(prefix)
        .map(str::to_string)
        .ok_or_else(|| corrupt("key outside the store prefix"))
}

fn versioned(kv: &KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        version: u64::try_from(kv.mod_revision()).unwrap_or(0),
    }
}

fn revision(header: Option<&ResponseHeader>) -> u64 {
    header.map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let mut client = self.client.clone();
        let resp = bounded(REQUEST_TIMEOUT, client.get(self.full_key(key), None))
            .await
            .map_err(|source| StoreError::Read {
                key: key.to_string(),
                source,
            })?;
        self.observe(resp.header());
        Ok(resp.kvs().first().map(versioned))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let read_err = |source: BoxError| StoreError::Read {
            key: prefix.to_string(),
            source,
        };
        let mut client = self.client.clone();
        let start = self.full_key(prefix).into_bytes();
        let end = prefix_end(&start);
        let mut from = start;
        // Pinned to the first page's revision, so all pages form one snapshot.
        let mut at_revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if at_revision != 0 {
                options = options.with_revision(at_revision);
            }
            let resp = bounded(REQUEST_TIMEOUT, client.get(from.clone(), Some(options)))
                .await
                .map_err(read_err)?;
            self.observe(resp.header());
            if at_revision == 0 {
                at_revision = resp.header().map_or(0, |h| h.revision());
            }
            // etcd returns a range in key order.
            for kv in resp.kvs() {
                out.push((local_key(&self.prefix, kv)?, versioned(kv)));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut client = self.client.clone();
        let start = self.full_key(prefix).into_bytes();
        let end = prefix_end(&start);
        let from = match after {
            Some(a) if a >= prefix => {
                let mut k = self.full_key(a).into_bytes();
                k.push(0);
                k
            }
            _ => start,
        };
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let resp = bounded(REQUEST_TIMEOUT, client.get(from, Some(options)))
            .await
            .map_err(|source| StoreError::Read {
                key: prefix.to_string(),
                source,
            })?;
        self.observe(resp.header());
        resp.kvs()
            .iter()
            .map(|kv| Ok((local_key(&self.prefix, kv)?, versioned(kv))))
            .collect()
    }

    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<u64, StoreError> {
        let conflict = || StoreError::Conflict {
            key: key.to_string(),
        };
        let full = self.full_key(key);
        let compares = match pre {
            Precondition::Any if !self.fenced() => {
                let mut client = self.client.clone();
                let resp = bounded(REQUEST_TIMEOUT, client.put(full, value, None))
                    .await
                    .map_err(|source| StoreError::Write {
                        key: key.to_string(),
                        source,
                    })?;
                self.observe(resp.header());
                return Ok(revision(resp.header()));
            }
            Precondition::Any => Vec::new(),
            Precondition::Absent => {
                vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)]
            }
            Precondition::Version(v) => {
                // No etcd revision is that large, so nothing can match it.
                let v = i64::try_from(v).map_err(|_| conflict())?;
                vec![Compare::mod_revision(full.clone(), CompareOp::Equal, v)]
            }
        };
        let (held, rev) = self
            .commit(compares, vec![TxnOp::put(full, value, None)], key)
            .await?;
        if !held {
            return Err(conflict());
        }
        Ok(rev)
    }

    async fn put_all(
        &self,
        writes: Vec<(String, Vec<u8>, Precondition)>,
    ) -> Result<Vec<u64>, StoreError> {
        let Some(first) = writes.first().map(|w| w.0.clone()) else {
            return Ok(Vec::new());
        };
        let n = writes.len();
        let mut compares = Vec::new();
        let mut puts = Vec::with_capacity(n);
        for (key, value, pre) in writes {
            let full = self.full_key(&key);
            match pre {
                Precondition::Any => {}
                Precondition::Absent => {
                    compares.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0))
                }
                Precondition::Version(v) => {
                    let Ok(v) = i64::try_from(v) else {
                        return Err(StoreError::Conflict { key });
                    };
                    compares.push(Compare::mod_revision(full.clone(), CompareOp::Equal, v));
                }
            }
            puts.push(TxnOp::put(full, value, None));
        }
        let (held, rev) = self.commit(compares, puts, &first).await?;
        if !held {
            return Err(StoreError::Conflict {
                key: format!("{first} (or another of {n} keys written together)"),
            });
        }
        // One transaction, one revision: every key's new version.
        Ok(vec![rev; n])
    }

    fn max_batch(&self) -> usize {
        MAX_TXN_OPS
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        if self.fenced() {
            let op = TxnOp::delete(self.full_key(key), None);
            return self.commit(Vec::new(), vec![op], key).await.map(drop);
        }
        let mut client = self.client.clone();
        let resp = bounded(REQUEST_TIMEOUT, client.delete(self.full_key(key), None))
            .await
            .map_err(|source| StoreError::Write {
                key: key.to_string(),
                source,
            })?;
        self.observe(resp.header());
        Ok(())
    }

    fn watch(&self, prefix: &str) -> WatchStream {
        // Start right after the last revision this handle saw: nothing later is missed, even
        // though the etcd watch itself is only created when the stream is first polled.
        let start = self.seen.load(Ordering::Relaxed) + 1;
        let mut client = self.client.clone();
        let full = self.full_key(prefix);
        let namespace = self.prefix.clone();
        let seen = self.seen.clone();
        let prefix = prefix.to_string();
        async_stream::stream! {
            let watch_err = |source: BoxError| StoreError::Watch { prefix: prefix.clone(), source };
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(i64::try_from(start).unwrap_or(i64::MAX));
            let mut stream = match bounded(REQUEST_TIMEOUT, client.watch(full, Some(options))).await {
                Ok(stream) => stream,
                Err(source) => {
                    yield Err(watch_err(source));
                    return;
                }
            };
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        yield Err(watch_err("etcd closed the watch stream".into()));
                        return;
                    }
                    Err(e) => {
                        yield Err(watch_err(e.into()));
                        return;
                    }
                };
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        yield Err(StoreError::WatchGap {
                            prefix: prefix.clone(),
                            reason: format!(
                                "history compacted up to revision {}",
                                resp.compact_revision()
                            ),
                        });
                    } else {
                        yield Err(watch_err(
                            format!("etcd cancelled the watch: {}", resp.cancel_reason()).into(),
                        ));
                    }
                    return;
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    seen.fetch_max(u64::try_from(kv.mod_revision()).unwrap_or(0), Ordering::Relaxed);
                    let key = match local_key(&namespace, kv) {
                        Ok(key) => key,
                        Err(e) => {
                            yield Err(e);
                            return;
                        }
                    };
                    yield Ok(match event.event_type() {
                        EventType::Put => WatchEvent::Put { key, value: versioned(kv) },
                        EventType::Delete => WatchEvent::Delete { key },
                    });
                }
            }
        }
        .boxed()
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/runyard/"), b"/runyard0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[tokio::test]
    async fn unreachable_cluster_fails_in_time_naming_the_endpoints() {
        // Bind then drop: a loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoints = vec![format!("127.0.0.1:{port}"), "127.0.0.1:1".to_string()];
        let started = std::time::Instant::now();
        let err = EtcdStore::connect(&endpoints, "/runyard/", Duration::from_secs(1))
            .await
            .err()
            .expect("connect fails");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Connect { .. }), "{err:?}");
        assert!(
            msg.contains(&format!("127.0.0.1:{port},127.0.0.1:1")),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn bad_prefix_is_refused_before_connecting() {
        let err = EtcdStore::connect(&["127.0.0.1:1".into()], "runyard", Duration::from_secs(1))
            .await
            .err()
            .expect("connect fails");
        assert!(
            err.to_string().contains("must start and end with /"),
            "{err}"
        );
    }
}
