//! The controller's state store: a narrow key-value interface (get, list by prefix,
//! compare-and-swap put, delete, watch) with an embedded backend ([`file`], one redb file) and a
//! replicated one ([`etcd`]). Invariants: values are opaque bytes; a key's version strictly
//! increases with every write to it, also across delete and re-create; a watch delivers committed
//! changes in commit order and ends after its first error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::BoxStream;

pub mod etcd;
pub mod file;

pub use etcd::EtcdStore;
pub use file::FileStore;

/// File name of the embedded store inside the data dir (`file:` with no path).
pub const DEFAULT_FILE_NAME: &str = "state.redb";
/// Key namespace inside etcd when the URL names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/runyard/";

/// A value with the version of the write that stored it.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// Store-wide revision of the key's last write: strictly increasing per key, never 0.
    pub version: u64,
}

/// What a [`Store::put`] requires of the key's current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    Any,
    /// Write only if the key does not exist (create).
    Absent,
    /// Write only if the key exists at exactly this version (compare-and-swap).
    Version(u64),
}

/// One committed change seen by [`Store::watch`].
#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    Put { key: String, value: Versioned },
    Delete { key: String },
}

impl WatchEvent {
    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key,
        }
    }
}

/// Underlying error of a backend call, kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed; variants name the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid store URL {url:?}: {reason} (expected file:, file:PATH or \
         etcd://host:port[,host:port...][/prefix])"
    )]
    Url { url: String, reason: String },
    #[error("cannot open store file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("data dir in use: store file {path} is already open in another process")]
    InUse { path: PathBuf },
    #[error("cannot connect to etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
    #[error("precondition failed for key {key:?}: it was changed, created or deleted meanwhile")]
    Conflict { key: String },
    #[error(
        "write of {key:?} refused: this controller no longer leads (another controller was elected)"
    )]
    Fenced { key: String },
    #[error("store read of {key:?} failed: {source}")]
    Read {
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("store write of {key:?} failed: {source}")]
    Write {
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("store watch of {prefix:?} failed: {source}")]
    Watch {
        prefix: String,
        #[source]
        source: BoxError,
    },
    #[error("store watch of {prefix:?} missed changes ({reason}): list again and watch again")]
    WatchGap { prefix: String, reason: String },
    #[error("corrupt store entry {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store operation cancelled")]
    Cancelled,
}

/// A stream of changes from [`Store::watch`].
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// The controller's only access to durable state (Nomad's StateDB-like narrow interface).
///
/// To follow a prefix without gaps: call [`Store::watch`] first, then [`Store::list`], and keep
/// for each key the entry with the highest version; a watch may also replay changes made shortly
/// before it was called, never skips one made after.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's current value, `None` if absent.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// All keys with this prefix, in key order, as one consistent snapshot.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// At most `limit` keys with this prefix that sort strictly after `after` (from the first
    /// key when `None`), in key order. Pages are not one snapshot: follow a prefix by watching
    /// first (see above) and paging through it, to read any number of keys in bounded memory.
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Compare-and-swap put; returns the new version. Conflict when the precondition fails.
    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<u64, StoreError>;
    /// Several compare-and-swap puts in one atomic transaction: all are written, or none
    /// (`Conflict` when any precondition fails). Returns the new versions in order. At most
    /// [`Store::max_batch`] writes, each key at most once.
    async fn put_all(
        &self,
        writes: Vec<(String, Vec<u8>, Precondition)>,
    ) -> Result<Vec<u64>, StoreError>;
    /// The most writes one [`Store::put_all`] takes.
    fn max_batch(&self) -> usize;
    /// Removes the key; removing an absent key succeeds and changes nothing.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Changes under prefix from now on. An `Err` item is the last one: the watcher missed or may
    /// miss changes and must list and watch again.
    fn watch(&self, prefix: &str) -> WatchStream;
    /// Short name for logs ("file", "etcd").
    fn kind(&self) -> &'static str;
}

/// A parsed `--store` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// Embedded redb file.
    File(PathBuf),
    /// etcd cluster: `host:port` endpoints and the key prefix (starts and ends with `/`).
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl StoreUrl {
    /// Parses `file:`, `file:PATH` (relative to the working directory) or
    /// `etcd://host:port[,host:port...][/prefix]`; `file:` means `<data_dir>/state.redb`.
    pub fn parse(url: &str, data_dir: &Path) -> Result<StoreUrl, StoreError> {
        let bad = |reason: &str| StoreError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = url.strip_prefix("etcd://") {
            let (hosts, prefix) = match rest.split_once('/') {
                Some((hosts, prefix)) => (hosts, prefix),
                None => (rest, ""),
            };
            let mut endpoints = Vec::new();
            for host in hosts.split(',') {
                let Some((name, port)) = host.rsplit_once(':') else {
                    return Err(bad(&format!("endpoint {host:?} is not host:port")));
                };
                if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(bad(&format!("endpoint {host:?} is not host:port")));
                }
                endpoints.push(host.to_string());
            }
            let prefix = prefix.trim_matches('/');
            let prefix = if prefix.is_empty() {
                DEFAULT_ETCD_PREFIX.to_string()
            } else if prefix.split('/').any(str::is_empty) {
                return Err(bad("the prefix has an empty path segment"));
            } else {
                format!("/{prefix}/")
            };
            Ok(StoreUrl::Etcd { endpoints, prefix })
        } else if let Some(path) = url.strip_prefix("file:") {
            if path.is_empty() {
                Ok(StoreUrl::File(data_dir.join(DEFAULT_FILE_NAME)))
            } else {
                Ok(StoreUrl::File(PathBuf::from(path)))
            }
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

/// Opens the store named by `url` (see [`StoreUrl::parse`]).
pub async fn open(url: &str, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match StoreUrl::parse(url, data_dir)? {
        StoreUrl::File(path) => Ok(Arc::new(FileStore::open(&path).await?)),
        StoreUrl::Etcd { endpoints, prefix } => Ok(Arc::new(
            EtcdStore::connect(&endpoints, &prefix, etcd::CONNECT_TIMEOUT).await?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        StoreUrl::parse(url, Path::new("/var/lib/runyard"))
    }

    fn etcd(endpoints: &[&str], prefix: &str) -> StoreUrl {
        StoreUrl::Etcd {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: prefix.to_string(),
        }
    }

    #[test]
    fn parses_good_urls() {
        let cases = [
            (
                "file:",
                StoreUrl::File("/var/lib/runyard/state.redb".into()),
            ),
            ("file:/tmp/x.redb", StoreUrl::File("/tmp/x.redb".into())),
            ("file:rel/x.redb", StoreUrl::File("rel/x.redb".into())),
            ("etcd://h:2379", etcd(&["h:2379"], "/runyard/")),
            ("etcd://h:2379/", etcd(&["h:2379"], "/runyard/")),
            (
                "etcd://a:1,10.0.0.2:2/team/a",
                etcd(&["a:1", "10.0.0.2:2"], "/team/a/"),
            ),
            ("etcd://h:1/x/", etcd(&["h:1"], "/x/")),
        ];
        for (url, want) in cases {
            assert_eq!(parse(url).unwrap(), want, "{url}");
        }
    }

    #[test]
    fn rejects_bad_urls_naming_the_problem() {
        let cases = [
            ("redis://h:1", "unknown scheme"),
            ("", "unknown scheme"),
            ("etcd://", "endpoint \"\" is not host:port"),
            ("etcd://h", "endpoint \"h\" is not host:port"),
            ("etcd://h:x", "endpoint \"h:x\" is not host:port"),
            ("etcd://h:0", "endpoint \"h:0\" is not host:port"),
            ("etcd://:1", "endpoint \":1\" is not host:port"),
            ("etcd://a:1,,b:2", "endpoint \"\" is not host:port"),
            ("etcd://a:1/x//y", "empty path segment"),
        ];
        for (url, want) in cases {
            let err = parse(url).unwrap_err();
            assert!(matches!(err, StoreError::Url { .. }), "{url}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(want), "{url}: {msg}");
            assert!(msg.contains("expected file:"), "{url}: {msg}");
        }
    }

    #[test]
    fn watch_event_key() {
        let put = WatchEvent::Put {
            key: "a".into(),
            value: Versioned {
                value: vec![],
                version: 1,
            },
        };
        assert_eq!(put.key(), "a");
        assert_eq!(WatchEvent::Delete { key: "b".into() }.key(), "b");
    }
}
