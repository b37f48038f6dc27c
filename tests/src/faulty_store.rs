//! A [`Store`] wrapper that injects the failures a real cluster produces: a write that commits
//! but whose answer is lost (a timeout), a write that fails, another writer getting in first (a
//! compare-and-swap conflict), and a key whose writes keep failing. Faults are armed per key and
//! used up in order; everything else passes through to the wrapped store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use runyard_controller::store::{Precondition, Store, StoreError, Versioned, WatchStream};

/// One injected failure of a `put`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The write commits, then the caller gets a timeout error.
    CommitThenTimeout,
    /// The write does not happen; the caller gets an error.
    Fail,
    /// Another writer rewrites the key first, so a compare-and-swap conflicts.
    OtherWriterFirst,
    /// The write commits and its answer is lost, and the read that follows fails too.
    CommitThenTimeoutAndUnreadable,
}

#[derive(Default)]
struct Faults {
    armed: HashMap<String, VecDeque<Fault>>,
    broken: HashSet<String>,
    unreadable_once: HashSet<String>,
    injected: usize,
    puts: usize,
    batches: usize,
}

/// See the module docs.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    faults: Mutex<Faults>,
}

fn injected(key: &str, what: &str) -> StoreError {
    StoreError::Write {
        key: key.to_string(),
        source: format!("injected: {what}").into(),
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            faults: Mutex::default(),
        })
    }

    /// The next `put` of `key` fails as `fault` says (faults queue up per key; `put_all` only
    /// honours broken keys).
    pub fn arm(&self, key: &str, fault: Fault) {
        let mut f = self.faults.lock().unwrap();
        f.armed.entry(key.to_string()).or_default().push_back(fault);
    }

    /// Every `put` of `key` fails until [`FaultyStore::heal`].
    pub fn break_key(&self, key: &str) {
        self.faults.lock().unwrap().broken.insert(key.to_string());
    }

    pub fn heal(&self, key: &str) {
        self.faults.lock().unwrap().broken.remove(key);
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> usize {
        self.faults.lock().unwrap().injected
    }

    /// Calls of `put` and of `put_all` so far.
    pub fn writes(&self) -> (usize, usize) {
        let f = self.faults.lock().unwrap();
        (f.puts, f.batches)
    }

    /// Whether armed faults are still waiting.
    pub fn pending(&self) -> usize {
        self.faults
            .lock()
            .unwrap()
            .armed
            .values()
            .map(VecDeque::len)
            .sum()
    }
}

#[async_trait::async_trait]
impl Store for FaultyStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        if self.faults.lock().unwrap().unreadable_once.remove(key) {
            return Err(StoreError::Read {
                key: key.to_string(),
                source: "injected: no answer".into(),
            });
        }
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.list_page(prefix, after, limit).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<u64, StoreError> {
        let fault = {
            let mut f = self.faults.lock().unwrap();
            f.puts += 1;
            let fault = if f.broken.contains(key) {
                Some(Fault::Fail)
            } else {
                f.armed.get_mut(key).and_then(VecDeque::pop_front)
            };
            if fault.is_some() {
                f.injected += 1;
            }
            if fault == Some(Fault::CommitThenTimeoutAndUnreadable) {
                f.unreadable_once.insert(key.to_string());
            }
            fault
        };
        match fault {
            None => self.inner.put(key, value, pre).await,
            Some(Fault::Fail) => Err(injected(key, "write failed")),
            Some(Fault::CommitThenTimeout | Fault::CommitThenTimeoutAndUnreadable) => {
                self.inner.put(key, value, pre).await?;
                Err(injected(key, "no answer within 10s"))
            }
            Some(Fault::OtherWriterFirst) => {
                if let Some(current) = self.inner.get(key).await? {
                    self.inner
                        .put(key, current.value, Precondition::Any)
                        .await?;
                }
                self.inner.put(key, value, pre).await
            }
        }
    }

    /// A transaction meets the first fault armed for any of its keys (or a broken key), as a
    /// whole: it fails before anything is written, commits with its answer lost, or finds
    /// another writer's change to that key first.
    async fn put_all(
        &self,
        writes: Vec<(String, Vec<u8>, Precondition)>,
    ) -> Result<Vec<u64>, StoreError> {
        let fault = {
            let mut f = self.faults.lock().unwrap();
            f.batches += 1;
            let mut found = None;
            for (key, ..) in &writes {
                if f.broken.contains(key) {
                    found = Some((key.clone(), Fault::Fail));
                    break;
                }
                if let Some(fault) = f.armed.get_mut(key).and_then(VecDeque::pop_front) {
                    found = Some((key.clone(), fault));
                    break;
                }
            }
            if let Some((key, fault)) = &found {
                f.injected += 1;
                if *fault == Fault::CommitThenTimeoutAndUnreadable {
                    f.unreadable_once.insert(key.clone());
                }
            }
            found
        };
        match fault {
            None => self.inner.put_all(writes).await,
            Some((key, Fault::Fail)) => Err(injected(&key, "write failed")),
            Some((key, Fault::CommitThenTimeout | Fault::CommitThenTimeoutAndUnreadable)) => {
                self.inner.put_all(writes).await?;
                Err(injected(&key, "no answer within 10s"))
            }
            Some((key, Fault::OtherWriterFirst)) => {
                if let Some(current) = self.inner.get(&key).await? {
                    self.inner
                        .put(&key, current.value, Precondition::Any)
                        .await?;
                }
                self.inner.put_all(writes).await
            }
        }
    }

    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    fn watch(&self, prefix: &str) -> WatchStream {
        self.inner.watch(prefix)
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}
