//! The job table: the controller's view of the jobs in its store, kept by following the store's
//! watch. The store is the truth; this view only ever moves forward to newer versions of a key.
//!
//! A job is stored as two kinds of record (see `runyard_model::{Intent, Placement}`): its intent
//! at `jobs/ID` and each placement at `placements/ID/ATTEMPT`. A transition that touches both
//! writes both in one atomic transaction; a report or an attempt's status that touches only the
//! placement rewrites only the placement. Records of schema version 1 (a flat job, from earlier
//! versions) are read as an intent with its current placement and rewritten as two records on
//! their next write.
//!
//! Memory holds what the control loop needs and nothing that grows with history: every job's
//! id, status and version (an index for paging and filtering), the intent and current placement
//! of every active job, and a bounded set of recently finished ones. Older finished jobs are
//! read from the store when asked for (`fetch`, `page`).
//!
//! Invariants:
//! - A key's entry is only replaced by a higher version of that key (writes, watch events and
//!   re-reads all go through `Table::install_*`), so the view never runs backwards.
//! - This controller's writes go through one async writer lock, each a compare-and-swap on the
//!   versions last seen. A conflict re-reads that job and applies the change again (bounded by
//!   `MAX_TRIES`). A write whose outcome is unknown (a timeout that may have committed) is
//!   settled by reading its keys back: a committed write is never reported as failed, and a
//!   write that could not be settled marks the entry stale, so the next write re-reads it first
//!   instead of conflicting forever.
//! - Changes by any writer reach the view through the watch; a broken watch is re-established
//!   and followed by a fresh paged listing, so a missed change is repaired, not kept. The two
//!   prefixes are watched apart, so an intent may name a placement the view has not seen yet:
//!   `JobState::is_incomplete`, which reconcile leaves for a later pass.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use runyard_model::intent::INTENT_SCHEMA_VERSION;
use runyard_model::job::first_schema_version;
use runyard_model::{Intent, Job, JobState, JobStatus, Placed, Placement};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::store::{Precondition, Store, StoreError, Versioned, WatchEvent, WatchStream};

/// Where intents live: `jobs/ID`.
pub const INTENTS: &str = "jobs/";
/// Where placements live: `placements/ID/ATTEMPT` (the attempt zero-padded to 10 digits, so
/// keys sort by attempt).
pub const PLACEMENTS: &str = "placements/";
/// Finished jobs whose records stay in memory (the most recently changed ones).
pub const RECENT_FINISHED: usize = 1024;
/// Keys read per store call when listing.
const LIST_PAGE: usize = 1000;
/// Attempts of one update when its compare-and-swap keeps conflicting.
const MAX_TRIES: usize = 4;
/// Changes buffered per subscriber of [`Jobs::changes`] before it is told it fell behind.
const CHANGES_BUFFER: usize = 1024;
/// Wait between attempts to re-establish a broken watch.
const REWATCH_BACKOFF: Duration = Duration::from_millis(500);
const REWATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The key of a job's intent.
pub fn intent_key(id: &str) -> String {
    format!("{INTENTS}{id}")
}

/// The key of one placement of a job.
pub fn placement_key(id: &str, attempt: u32) -> String {
    format!("{PLACEMENTS}{id}/{attempt:010}")
}

fn placements_of(id: &str) -> String {
    format!("{PLACEMENTS}{id}/")
}

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    table: Mutex<Table>,
    write: tokio::sync::Mutex<()>,
    /// Bumped after every change the view takes.
    changed: watch::Sender<u64>,
    /// Every change, for live views.
    changes: broadcast::Sender<Change>,
    /// The watch opened before the first listing, handed to `follow`.
    first_watch: Mutex<Option<WatchStream>>,
}

/// One change of the view.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A job was created or changed: its new view.
    Job(Arc<Job>),
    /// A job was deleted.
    Removed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    #[error("job record {key} is unreadable: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

/// What every job costs in memory: its id, status and intent version, plus its intent while it
/// is active or recently finished.
struct Entry {
    status: JobStatus,
    version: u64,
    intent: Option<Arc<Intent>>,
    /// Read from a schema version 1 record: the next write stores it as intent + placement.
    legacy: bool,
    /// A write's outcome is unknown: read the job before writing it again.
    stale: bool,
}

/// The latest placement of a job whose intent is in memory.
#[derive(Clone)]
struct Current {
    placement: Placement,
    /// Version of its key; 0 while it exists only inside a version 1 record.
    version: u64,
    earlier: Vec<Placed>,
}

/// A job read whole, with the versions of its keys (0: not in the store).
#[derive(Clone)]
struct Loaded {
    state: JobState,
    iv: u64,
    pv: u64,
    legacy: bool,
}

#[derive(Default)]
struct Table {
    /// Every job by id; ids sort by creation time.
    index: BTreeMap<String, Entry>,
    /// The latest placement of the jobs whose intent is in memory.
    placements: HashMap<String, Current>,
    /// Ids of the jobs that are not finished.
    active: BTreeSet<String>,
    /// Finished jobs whose records are kept, oldest first; may repeat an id.
    recent: VecDeque<String>,
}

/// Only what the index needs of an intent.
#[derive(Deserialize)]
struct Head {
    id: String,
    status: JobStatus,
    #[serde(default = "first_schema_version")]
    schema_version: u32,
    #[serde(default)]
    attempt: u32,
}

impl Table {
    /// Takes a version of a job's intent when it is newer than the view's. Returns whether it
    /// did.
    fn install_intent(&mut self, intent: Intent, version: u64, legacy: bool) -> bool {
        if let Some(e) = self.index.get_mut(&intent.id) {
            if e.version > version {
                return false;
            }
            if e.version == version {
                // The same write seen again (our own, then through the watch, or re-read).
                e.stale = false;
                if e.intent.is_none() {
                    let id = intent.id.clone();
                    e.intent = Some(Arc::new(intent));
                    e.legacy = legacy;
                    if e.status.is_terminal() {
                        self.remember(id);
                    }
                }
                return false;
            }
        }
        let id = intent.id.clone();
        let finished = intent.status.is_terminal();
        self.index.insert(
            id.clone(),
            Entry {
                status: intent.status,
                version,
                intent: Some(Arc::new(intent)),
                legacy,
                stale: false,
            },
        );
        if finished {
            self.active.remove(&id);
            self.remember(id);
        } else {
            self.active.insert(id);
        }
        true
    }

    /// Takes a version of a placement when its job's intent is in memory and it is newer than
    /// the view's: a later attempt, or a higher version of the same one.
    fn install_placement(
        &mut self,
        p: Placement,
        version: u64,
        earlier: Option<Vec<Placed>>,
    ) -> bool {
        if self.index.get(&p.job).is_none_or(|e| e.intent.is_none()) {
            return false;
        }
        let mut prior = Vec::new();
        if let Some(c) = self.placements.get(&p.job) {
            if p.attempt < c.placement.attempt {
                return false;
            }
            if p.attempt == c.placement.attempt {
                let older = match (version, c.version) {
                    // A copy inside a version 1 record never replaces a stored placement.
                    (0, 0) => c.placement == p,
                    (0, _) => true,
                    (_, 0) => false,
                    (v, cv) => v <= cv,
                };
                if older {
                    return false;
                }
            }
            prior = c.earlier.clone();
            if c.placement.attempt < p.attempt {
                prior.push(Placed {
                    attempt: c.placement.attempt,
                    agent: c.placement.agent.clone(),
                });
            }
        }
        let earlier = earlier.unwrap_or(prior);
        self.placements.insert(
            p.job.clone(),
            Current {
                placement: p,
                version,
                earlier,
            },
        );
        true
    }

    /// Takes a job read whole (or just written). Returns whether anything in it was new.
    fn install(&mut self, l: Loaded) -> bool {
        let Loaded {
            state,
            iv,
            pv,
            legacy,
        } = l;
        let JobState {
            intent,
            placement,
            earlier,
        } = state;
        let mut changed = self.install_intent(intent, iv, legacy);
        if let Some(p) = placement {
            changed |= self.install_placement(p, pv, Some(earlier));
        }
        changed
    }

    /// Records a finished job by its head only (its records stay in the store).
    fn install_head(&mut self, head: Head, version: u64) {
        if self
            .index
            .get(&head.id)
            .is_some_and(|e| e.version >= version)
        {
            return;
        }
        self.active.remove(&head.id);
        self.placements.remove(&head.id);
        self.index.insert(
            head.id,
            Entry {
                status: head.status,
                version,
                intent: None,
                legacy: false,
                stale: false,
            },
        );
    }

    fn remove(&mut self, id: &str) -> bool {
        self.active.remove(id);
        self.placements.remove(id);
        self.index.remove(id).is_some()
    }

    /// Keeps a finished job's records among the recent ones, dropping the oldest beyond the cap.
    fn remember(&mut self, id: String) {
        self.recent.push_back(id);
        while self.recent.len() > RECENT_FINISHED {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            if self.recent.contains(&old) {
                continue;
            }
            if let Some(e) = self.index.get_mut(&old)
                && e.status.is_terminal()
            {
                e.intent = None;
                self.placements.remove(&old);
            }
        }
    }

    /// The job as memory has it, when memory has a trustworthy copy.
    fn cached(&self, id: &str) -> Option<Loaded> {
        let e = self.index.get(id)?;
        if e.stale {
            return None;
        }
        let state = self.state_of(e.intent.as_deref()?);
        Some(Loaded {
            state,
            iv: e.version,
            pv: self.placements.get(id).map_or(0, |c| c.version),
            legacy: e.legacy,
        })
    }

    fn view(&self, id: &str) -> Option<Job> {
        let e = self.index.get(id)?;
        Some(self.state_of(e.intent.as_deref()?).view())
    }

    /// An intent in memory with its latest placement, as one state.
    fn state_of(&self, intent: &Intent) -> JobState {
        let current = self.placements.get(&intent.id);
        JobState {
            intent: intent.clone(),
            placement: current.map(|c| c.placement.clone()),
            earlier: current.map(|c| c.earlier.clone()).unwrap_or_default(),
        }
    }
}

/// An intent record: of this version, or a flat job of schema version 1.
enum Decoded {
    Intent(Box<Intent>),
    Legacy(Box<JobState>),
}

fn decode_err(key: &str) -> impl FnOnce(serde_json::Error) -> JobsError + '_ {
    move |source| JobsError::Decode {
        key: key.to_string(),
        source,
    }
}

fn decode_intent(key: &str, value: &[u8]) -> Result<Decoded, JobsError> {
    let head: Head = serde_json::from_slice(value).map_err(decode_err(key))?;
    if head.schema_version < INTENT_SCHEMA_VERSION {
        let job: Job = serde_json::from_slice(value).map_err(decode_err(key))?;
        return Ok(Decoded::Legacy(Box::new(JobState::from_legacy(job))));
    }
    Ok(Decoded::Intent(Box::new(
        serde_json::from_slice(value).map_err(decode_err(key))?,
    )))
}

fn decode_placement(key: &str, value: &[u8]) -> Result<Placement, JobsError> {
    serde_json::from_slice(value).map_err(decode_err(key))
}

/// The stored placements of a job with their versions, oldest first. A record that cannot be
/// read, or that names another job, is logged and left out.
async fn stored_placements(
    store: &dyn Store,
    id: &str,
) -> Result<Vec<(Placement, u64)>, JobsError> {
    let mut stored = Vec::new();
    for (key, v) in store.list(&placements_of(id)).await? {
        match decode_placement(&key, &v.value) {
            Ok(p) if p.job == id => stored.push((p, v.version)),
            Ok(_) => error!(%key, "placement record skipped: it names another job"),
            Err(error) => error!(%key, %error, "placement record skipped: it cannot be read"),
        }
    }
    Ok(stored)
}

/// Reads a job whole: its intent and its placements.
async fn load(store: &dyn Store, id: &str) -> Result<Option<Loaded>, JobsError> {
    let key = intent_key(id);
    let Some(v) = store.get(&key).await? else {
        return Ok(None);
    };
    let decoded = decode_intent(&key, &v.value)?;
    let mut stored = stored_placements(store, id).await?;
    let (intent, legacy_placement, legacy_earlier, legacy) = match decoded {
        Decoded::Intent(i) => (*i, None, Vec::new(), false),
        Decoded::Legacy(s) => (s.intent, s.placement, s.earlier, true),
    };
    let current = stored
        .iter()
        .position(|(p, _)| p.attempt == intent.attempt)
        .or_else(|| (!stored.is_empty() && legacy_placement.is_none()).then(|| stored.len() - 1));
    let (placement, pv, earlier) = match current {
        Some(i) => {
            let earlier = stored
                .iter()
                .filter(|(p, _)| p.attempt < stored[i].0.attempt)
                .map(|(p, _)| Placed {
                    attempt: p.attempt,
                    agent: p.agent.clone(),
                })
                .collect();
            let (p, pv) = stored.swap_remove(i);
            (Some(p), pv, earlier)
        }
        None => (legacy_placement, 0, legacy_earlier),
    };
    Ok(Some(Loaded {
        state: JobState {
            intent,
            placement,
            earlier,
        },
        iv: v.version,
        pv,
        legacy,
    }))
}

/// Reads every intent in pages: active jobs whole (with their placements), finished ones by
/// their head only. A record that cannot be read is logged and left out; it does not stop the
/// others.
async fn list_all(store: &dyn Store) -> Result<Table, JobsError> {
    let mut table = Table::default();
    let mut after: Option<String> = None;
    let mut placed = Vec::new();
    loop {
        let page = store
            .list_page(INTENTS, after.as_deref(), LIST_PAGE)
            .await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (key, v) in page {
            match install_listed(&mut table, &key, &v) {
                Ok(Some(id)) => placed.push(id),
                Ok(None) => {}
                Err(error) => error!(%key, %error, "job record skipped: it cannot be read"),
            }
        }
    }
    for id in placed {
        for (p, version) in stored_placements(store, &id).await? {
            table.install_placement(p, version, None);
        }
    }
    Ok(table)
}

/// Takes one listed intent. Returns the id when its placements must be read too.
fn install_listed(
    table: &mut Table,
    key: &str,
    v: &Versioned,
) -> Result<Option<String>, JobsError> {
    let head: Head = serde_json::from_slice(&v.value).map_err(decode_err(key))?;
    if head.status.is_terminal() {
        table.install_head(head, v.version);
        return Ok(None);
    }
    match decode_intent(key, &v.value)? {
        Decoded::Legacy(state) => {
            table.install(Loaded {
                state: *state,
                iv: v.version,
                pv: 0,
                legacy: true,
            });
            Ok(None)
        }
        Decoded::Intent(intent) => {
            let id = intent.id.clone();
            let placed = head.attempt > 0;
            table.install_intent(*intent, v.version, false);
            Ok(placed.then_some(id))
        }
    }
}

/// The writes that take a job from `cur` to `next`, in one transaction: the intent when it
/// changed (or is still a version 1 record), the placement when it changed or is new.
fn writes(cur: &Loaded, next: &JobState) -> Vec<(String, Vec<u8>, Precondition)> {
    let mut out = Vec::new();
    if next.intent != cur.state.intent || cur.legacy || cur.iv == 0 {
        let mut intent = next.intent.clone();
        intent.schema_version = INTENT_SCHEMA_VERSION;
        let pre = match cur.iv {
            0 => Precondition::Absent,
            v => Precondition::Version(v),
        };
        out.push((
            intent_key(&intent.id),
            serde_json::to_vec(&intent).expect("an intent always serializes"),
            pre,
        ));
    }
    if let Some(p) = &next.placement {
        let same = cur
            .state
            .placement
            .as_ref()
            .filter(|c| c.attempt == p.attempt);
        let pre = match same {
            Some(c) if c == p && cur.pv != 0 => None,
            Some(_) if cur.pv != 0 => Some(Precondition::Version(cur.pv)),
            _ => Some(Precondition::Absent),
        };
        if let Some(pre) = pre {
            out.push((
                placement_key(&p.job, p.attempt),
                serde_json::to_vec(p).expect("a placement always serializes"),
                pre,
            ));
        }
    }
    out
}

/// The job after `writes(cur, next)` committed with `versions`.
fn written(
    cur: &Loaded,
    next: JobState,
    puts: &[(String, Vec<u8>, Precondition)],
    versions: &[u64],
) -> Loaded {
    let mut l = Loaded {
        iv: cur.iv,
        pv: match (&cur.state.placement, &next.placement) {
            (Some(c), Some(n)) if c.attempt == n.attempt => cur.pv,
            _ => 0,
        },
        legacy: cur.legacy,
        state: next,
    };
    for ((key, _, _), v) in puts.iter().zip(versions) {
        if key.starts_with(INTENTS) {
            l.iv = *v;
            l.legacy = false;
        } else {
            l.pv = *v;
        }
    }
    l
}

/// What [`Jobs::update`] returns for one job: its new view.
pub type Updated<T> = Result<Option<(Job, T)>, JobsError>;

/// How a write whose outcome was unknown turned out.
enum Settled {
    /// Every key holds what was written: their versions.
    Committed(Vec<u64>),
    NotCommitted,
    Unknown,
}

type Puts = Vec<(String, Vec<u8>, Precondition)>;

impl Jobs {
    /// Opens the view: starts watching the store, then reads every job in pages. Call
    /// [`Jobs::follow`] to keep it current.
    pub async fn load(store: Arc<dyn Store>) -> Result<Jobs, JobsError> {
        // Watch first, then list: a change made during the listing arrives through the watch.
        let watch = watch_both(&*store);
        let table = list_all(&*store).await?;
        Ok(Jobs {
            inner: Arc::new(Inner {
                store,
                table: Mutex::new(table),
                write: tokio::sync::Mutex::new(()),
                changed: watch::channel(0).0,
                changes: broadcast::channel(CHANGES_BUFFER).0,
                first_watch: Mutex::new(Some(watch)),
            }),
        })
    }

    /// Follows the store's watch until cancelled, taking every change into the view.
    pub async fn follow(self, cancel: CancellationToken) {
        let first = self.inner.first_watch.lock().unwrap().take();
        let mut watch = first.unwrap_or_else(|| watch_both(&*self.inner.store));
        let mut backoff = REWATCH_BACKOFF;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                e = watch.next() => e,
            };
            match event {
                Some(Ok(WatchEvent::Put { key, value })) => {
                    backoff = REWATCH_BACKOFF;
                    if let Err(error) = self.on_put(&key, value).await {
                        error!(%key, %error, "job record skipped: it cannot be read");
                    }
                }
                Some(Ok(WatchEvent::Delete { key })) => {
                    if let Some(id) = key.strip_prefix(INTENTS) {
                        self.forget(id);
                    }
                }
                broken => {
                    match broken {
                        Some(Err(error)) => warn!(%error, "job watch broke; listing again"),
                        _ => warn!("job watch ended; listing again"),
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(REWATCH_BACKOFF_MAX);
                    watch = watch_both(&*self.inner.store);
                    match self.relist().await {
                        Ok(n) => info!(jobs = n, "job view repaired after a broken watch"),
                        Err(error) => warn!(%error, "cannot list jobs; retrying"),
                    }
                }
            }
        }
    }

    async fn on_put(&self, key: &str, value: Versioned) -> Result<(), JobsError> {
        if key.starts_with(PLACEMENTS) {
            let p = decode_placement(key, &value.value)?;
            let id = p.job.clone();
            let changed =
                self.inner
                    .table
                    .lock()
                    .unwrap()
                    .install_placement(p, value.version, None);
            if changed {
                self.announce(&id);
            }
            return Ok(());
        }
        match decode_intent(key, &value.value)? {
            Decoded::Legacy(state) => {
                let id = state.intent.id.clone();
                let changed = self.inner.table.lock().unwrap().install(Loaded {
                    state: *state,
                    iv: value.version,
                    pv: 0,
                    legacy: true,
                });
                if changed {
                    self.announce(&id);
                }
            }
            Decoded::Intent(intent) => {
                let id = intent.id.clone();
                let attempt = intent.attempt;
                let (changed, missing) = {
                    let mut table = self.inner.table.lock().unwrap();
                    let changed = table.install_intent(*intent, value.version, false);
                    let missing = attempt > 0
                        && table.index.get(&id).is_some_and(|e| e.intent.is_some())
                        && table
                            .placements
                            .get(&id)
                            .is_none_or(|c| c.placement.attempt < attempt);
                    (changed, missing)
                };
                if missing {
                    // Written by another writer, or a job this view did not keep: read its
                    // placements (the one named may also still be on its way).
                    if let Some(l) = load(&*self.inner.store, &id).await? {
                        self.inner.table.lock().unwrap().install(l);
                    }
                }
                if changed || missing {
                    self.announce(&id);
                }
            }
        }
        Ok(())
    }

    /// Lists the store again and takes whatever the view missed.
    async fn relist(&self) -> Result<usize, JobsError> {
        let mut fresh = list_all(&*self.inner.store).await?;
        let missing: Vec<String> = {
            let table = self.inner.table.lock().unwrap();
            table
                .index
                .keys()
                .filter(|id| !fresh.index.contains_key(*id))
                .cloned()
                .collect()
        };
        let n = fresh.index.len();
        for (id, e) in fresh.index {
            let changed = {
                let mut table = self.inner.table.lock().unwrap();
                match e.intent {
                    Some(intent) => {
                        let mut changed =
                            table.install_intent(Arc::unwrap_or_clone(intent), e.version, e.legacy);
                        if let Some(c) = fresh.placements.remove(&id) {
                            changed |=
                                table.install_placement(c.placement, c.version, Some(c.earlier));
                        }
                        changed
                    }
                    None => {
                        table.install_head(
                            Head {
                                id: id.clone(),
                                status: e.status,
                                schema_version: INTENT_SCHEMA_VERSION,
                                attempt: 0,
                            },
                            e.version,
                        );
                        false
                    }
                }
            };
            if changed {
                self.announce(&id);
            }
        }
        // Gone from the listing: deleted, unless it was created after its page was read.
        for id in missing {
            if self.inner.store.get(&intent_key(&id)).await?.is_none() {
                self.forget(&id);
            }
        }
        Ok(n)
    }

    /// Takes a job read whole or just written, and tells subscribers when it is new.
    fn publish(&self, l: Loaded) -> bool {
        let id = l.state.intent.id.clone();
        let changed = self.inner.table.lock().unwrap().install(l);
        if changed {
            self.announce(&id);
        }
        changed
    }

    /// Tells subscribers that a job changed.
    fn announce(&self, id: &str) {
        let view = self.inner.table.lock().unwrap().view(id);
        self.inner.changed.send_modify(|v| *v += 1);
        if let Some(job) = view {
            let _ = self.inner.changes.send(Change::Job(Arc::new(job)));
        }
    }

    fn forget(&self, id: &str) {
        if self.inner.table.lock().unwrap().remove(id) {
            self.inner.changed.send_modify(|v| *v += 1);
            let _ = self.inner.changes.send(Change::Removed(id.to_string()));
        }
    }

    /// The store the table follows.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// A job whose records are in memory: every active job and the recently finished ones. Use
    /// [`Jobs::fetch`] for any job.
    pub fn get(&self, id: &str) -> Option<Job> {
        self.inner.table.lock().unwrap().view(id)
    }

    /// Any job, read from the store when its records are not in memory.
    pub async fn fetch(&self, id: &str) -> Result<Option<Job>, JobsError> {
        if let Some(job) = self.get(id) {
            return Ok(Some(job));
        }
        if !self.inner.table.lock().unwrap().index.contains_key(id) {
            return Ok(None);
        }
        Ok(load(&*self.inner.store, id).await?.map(|l| l.state.view()))
    }

    /// Every placement of a job, oldest first, read from the store.
    pub async fn placements(&self, id: &str) -> Result<Option<Vec<Placement>>, JobsError> {
        if !self.inner.table.lock().unwrap().index.contains_key(id) {
            return Ok(None);
        }
        let key = intent_key(id);
        let Some(v) = self.inner.store.get(&key).await? else {
            return Ok(None);
        };
        let mut out: Vec<Placement> = stored_placements(&*self.inner.store, id)
            .await?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        // A version 1 record's placement lives inside it until its next write.
        if let Decoded::Legacy(s) = decode_intent(&key, &v.value)?
            && let Some(p) = s.placement
            && !out.iter().any(|o| o.attempt == p.attempt)
        {
            out.push(p);
        }
        Ok(Some(out))
    }

    /// Every job that is not finished, in id order.
    pub fn active(&self) -> Vec<Job> {
        let table = self.inner.table.lock().unwrap();
        table
            .active
            .iter()
            .filter_map(|id| table.view(id))
            .collect()
    }

    /// The state (intent and current placement) of every job that is not finished, in id
    /// order: what reconcile reads.
    pub fn active_states(&self) -> Vec<JobState> {
        let table = self.inner.table.lock().unwrap();
        table
            .active
            .iter()
            .filter_map(|id| Some(table.state_of(table.index.get(id)?.intent.as_deref()?)))
            .collect()
    }

    /// Ids of finished jobs after `after` in id (creation) order, at most `limit`: the
    /// retention task walks them a batch at a time.
    pub fn finished_after(&self, after: Option<&str>, limit: usize) -> Vec<String> {
        let table = self.inner.table.lock().unwrap();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        table
            .index
            .range::<str, (Bound<&str>, Bound<&str>)>((lower, Bound::Unbounded))
            .filter(|(_, e)| e.status.is_terminal())
            .take(limit)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many jobs the store holds.
    pub fn len(&self) -> usize {
        self.inner.table.lock().unwrap().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The jobs whose status passes `filter`, newest first, at most `limit`, starting strictly
    /// below `before` (an id cursor); and whether more follow.
    pub async fn page(
        &self,
        before: Option<&str>,
        limit: usize,
        filter: impl Fn(JobStatus) -> bool,
    ) -> Result<(Vec<Job>, bool), JobsError> {
        let (picked, more) = {
            let table = self.inner.table.lock().unwrap();
            let upper = before.map_or(Bound::Unbounded, Bound::Excluded);
            let mut picked: Vec<(String, Option<Job>)> = Vec::new();
            let mut more = false;
            for (id, e) in table
                .index
                .range::<str, (Bound<&str>, Bound<&str>)>((Bound::Unbounded, upper))
                .rev()
            {
                if !filter(e.status) {
                    continue;
                }
                if picked.len() == limit {
                    more = true;
                    break;
                }
                picked.push((
                    id.clone(),
                    e.intent.as_deref().map(|i| table.state_of(i).view()),
                ));
            }
            (picked, more)
        };
        let mut out = Vec::with_capacity(picked.len());
        for (id, job) in picked {
            match job {
                Some(job) => out.push(job),
                None => {
                    // Deleted meanwhile: leave it out.
                    if let Some(l) = load(&*self.inner.store, &id).await? {
                        out.push(l.state.view());
                    }
                }
            }
        }
        Ok((out, more))
    }

    /// Bumped after every change; for waiters that re-read what they show.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Every change from now on. A receiver that falls behind gets `Lagged` and should re-read.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// Stores a new job (its intent; a new job has no placement).
    pub async fn create(&self, state: JobState) -> Result<Job, JobsError> {
        let _w = self.inner.write.lock().await;
        let cur = Loaded {
            state: state.clone(),
            iv: 0,
            pv: 0,
            legacy: false,
        };
        let puts = writes(&cur, &state);
        let versions = match self.inner.store.put_all(puts.clone()).await {
            Ok(v) => v,
            Err(e @ StoreError::Conflict { .. }) => return Err(e.into()),
            Err(error) => match self.settle(state.id(), &puts).await {
                Settled::Committed(v) => v,
                Settled::NotCommitted | Settled::Unknown => return Err(error.into()),
            },
        };
        let view = state.view();
        self.publish(written(&cur, state, &puts, &versions));
        Ok(view)
    }

    /// Applies `f` to the job's current state and stores the result if it returns one. Returns
    /// the job's new view, or `None` when the job is unknown or `f` declined. On a conflict the
    /// job is read again and `f` applied to the fresh state, so `f` may run more than once.
    pub async fn update<T>(
        &self,
        id: &str,
        mut f: impl FnMut(&JobState) -> Option<(JobState, T)>,
    ) -> Updated<T> {
        let _w = self.inner.write.lock().await;
        let mut tries = 0;
        loop {
            tries += 1;
            let Some(cur) = self.current(id).await? else {
                return Ok(None);
            };
            let Some((next, extra)) = f(&cur.state) else {
                return Ok(None);
            };
            let puts = writes(&cur, &next);
            if puts.is_empty() {
                return Ok(Some((next.view(), extra)));
            }
            let error = match self.inner.store.put_all(puts.clone()).await {
                Ok(versions) => {
                    let view = next.view();
                    self.publish(written(&cur, next, &puts, &versions));
                    return Ok(Some((view, extra)));
                }
                Err(StoreError::Conflict { .. }) if tries < MAX_TRIES => {
                    warn!(job = %id, tries, "job changed meanwhile; reading it again");
                    self.mark_stale(id);
                    continue;
                }
                Err(e @ StoreError::Conflict { .. }) => {
                    self.mark_stale(id);
                    return Err(e.into());
                }
                Err(e) => e,
            };
            match self.settle(id, &puts).await {
                Settled::Committed(versions) => {
                    warn!(job = %id, %error, "job write reported an error but committed");
                    let view = next.view();
                    self.publish(written(&cur, next, &puts, &versions));
                    return Ok(Some((view, extra)));
                }
                Settled::NotCommitted | Settled::Unknown => return Err(error.into()),
            }
        }
    }

    /// Applies `f` to several jobs and stores the results in as few atomic store transactions as
    /// the store takes (`Store::max_batch` writes each; a job's intent and placement always go
    /// in the same one): the reconcile loop's placements cost one durable write per batch, not
    /// per job. A job whose records are not in memory, or whose batch conflicted or failed, goes
    /// through [`Jobs::update`] alone, so each job's result is what `update` would have
    /// returned. Results come in the order of `ids`; each id at most once.
    pub async fn update_many<T>(
        &self,
        ids: &[String],
        f: impl Fn(&JobState) -> Option<(JobState, T)>,
    ) -> Vec<Updated<T>> {
        struct Write<T> {
            i: usize,
            cur: Loaded,
            next: JobState,
            extra: T,
            puts: Puts,
        }
        let mut results: Vec<Option<Updated<T>>> = (0..ids.len()).map(|_| None).collect();
        let mut alone = Vec::new();
        {
            let _w = self.inner.write.lock().await;
            let mut writes_left = VecDeque::new();
            for (i, id) in ids.iter().enumerate() {
                let cached = self.inner.table.lock().unwrap().cached(id);
                let Some(cur) = cached else {
                    alone.push(i);
                    continue;
                };
                match f(&cur.state) {
                    None => results[i] = Some(Ok(None)),
                    Some((next, extra)) => {
                        let puts = writes(&cur, &next);
                        if puts.is_empty() {
                            results[i] = Some(Ok(Some((next.view(), extra))));
                        } else {
                            writes_left.push_back(Write {
                                i,
                                cur,
                                next,
                                extra,
                                puts,
                            });
                        }
                    }
                }
            }
            let max = self.inner.store.max_batch().max(2);
            while !writes_left.is_empty() {
                let mut batch = Vec::new();
                let mut n = 0;
                while let Some(w) = writes_left.front() {
                    if n > 0 && n + w.puts.len() > max {
                        break;
                    }
                    n += w.puts.len();
                    batch.push(writes_left.pop_front().expect("just seen"));
                }
                let puts: Puts = batch.iter().flat_map(|w| w.puts.iter().cloned()).collect();
                match self.inner.store.put_all(puts).await {
                    Ok(versions) => {
                        let mut versions = versions.into_iter();
                        for w in batch {
                            let v: Vec<u64> = versions.by_ref().take(w.puts.len()).collect();
                            let view = w.next.view();
                            self.publish(written(&w.cur, w.next, &w.puts, &v));
                            results[w.i] = Some(Ok(Some((view, w.extra))));
                        }
                    }
                    Err(StoreError::Conflict { .. }) => alone.extend(batch.iter().map(|w| w.i)),
                    Err(error) => {
                        warn!(%error, jobs = batch.len(), "batched job write failed; settling each job");
                        for w in batch {
                            match self.settle(w.next.id(), &w.puts).await {
                                Settled::Committed(v) => {
                                    let view = w.next.view();
                                    self.publish(written(&w.cur, w.next, &w.puts, &v));
                                    results[w.i] = Some(Ok(Some((view, w.extra))));
                                }
                                Settled::NotCommitted | Settled::Unknown => alone.push(w.i),
                            }
                        }
                    }
                }
            }
        }
        for i in alone {
            results[i] = Some(self.update(&ids[i], &f).await);
        }
        results
            .into_iter()
            .map(|r| r.expect("every job has a result"))
            .collect()
    }

    /// Deletes a job's records: its placements, then its intent (so an interrupted delete
    /// leaves a job that can be deleted again, never placements without a job). Returns the
    /// deleted job, or `None` if there was none.
    pub async fn remove(&self, id: &str) -> Result<Option<Job>, JobsError> {
        let _w = self.inner.write.lock().await;
        let Some(job) = self.fetch(id).await? else {
            return Ok(None);
        };
        for (key, _) in self.inner.store.list(&placements_of(id)).await? {
            self.inner.store.delete(&key).await?;
        }
        self.inner.store.delete(&intent_key(id)).await?;
        self.forget(id);
        Ok(Some(job))
    }

    /// The job as last written, reading it from the store when memory has no trustworthy copy.
    async fn current(&self, id: &str) -> Result<Option<Loaded>, JobsError> {
        let known = {
            let table = self.inner.table.lock().unwrap();
            if let Some(c) = table.cached(id).filter(|c| !c.state.is_incomplete()) {
                return Ok(Some(c));
            }
            table.index.contains_key(id)
        };
        if !known {
            return Ok(None);
        }
        match load(&*self.inner.store, id).await? {
            Some(l) => {
                // Equal versions are one write, so this also clears `stale`.
                self.publish(l.clone());
                Ok(Some(l))
            }
            None => {
                self.forget(id);
                Ok(None)
            }
        }
    }

    fn mark_stale(&self, id: &str) {
        if let Some(e) = self.inner.table.lock().unwrap().index.get_mut(id) {
            e.stale = true;
        }
    }

    /// Reads a job's keys back after a write whose outcome is unknown. The write was one
    /// transaction, so it committed when every key holds what it wrote.
    async fn settle(&self, id: &str, puts: &Puts) -> Settled {
        let mut versions = Vec::with_capacity(puts.len());
        for (key, wrote, _) in puts {
            match self.inner.store.get(key).await {
                Ok(Some(v)) if v.value == *wrote => versions.push(v.version),
                Ok(_) => {
                    // Not committed: take what the store holds instead.
                    self.mark_stale(id);
                    return Settled::NotCommitted;
                }
                Err(error) => {
                    warn!(job = %id, %error, "cannot read a job back after a failed write; it is re-read before the next write");
                    self.mark_stale(id);
                    return Settled::Unknown;
                }
            }
        }
        Settled::Committed(versions)
    }
}

/// One stream of the changes to intents and placements. Either watch ending ends it (with an
/// error), so the follower lists again instead of following half of the store.
fn watch_both(store: &dyn Store) -> WatchStream {
    let ended = |prefix: &'static str| {
        futures::stream::once(async move {
            Err(StoreError::WatchGap {
                prefix: prefix.to_string(),
                reason: "the watch ended".into(),
            })
        })
    };
    let intents = store.watch(INTENTS).chain(ended(INTENTS));
    let placements = store.watch(PLACEMENTS).chain(ended(PLACEMENTS));
    futures::stream::select(intents, placements).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::{JobSpec, Timestamp};

    fn intent(id: &str, status: JobStatus) -> Intent {
        let spec = JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py"}"#).unwrap();
        let mut i = Intent::new(id.into(), spec, Timestamp(1));
        i.status = status;
        i
    }

    fn head(id: &str, status: JobStatus) -> Head {
        Head {
            id: id.into(),
            status,
            schema_version: INTENT_SCHEMA_VERSION,
            attempt: 0,
        }
    }

    fn placement(id: &str, attempt: u32, agent: &str) -> Placement {
        Placement::new(id, attempt, agent, vec![], Timestamp(1))
    }

    #[test]
    fn install_only_moves_forward() {
        let mut t = Table::default();
        assert!(t.install_intent(intent("a", JobStatus::Running), 5, false));
        assert!(!t.install_intent(intent("a", JobStatus::Pending), 4, false));
        assert!(!t.install_intent(intent("a", JobStatus::Pending), 5, false));
        assert_eq!(t.index["a"].status, JobStatus::Running);
        assert!(t.install_intent(intent("a", JobStatus::Succeeded), 6, false));
        assert!(t.active.is_empty());
        assert_eq!(t.index["a"].status, JobStatus::Succeeded);
    }

    #[test]
    fn placements_only_move_forward() {
        let mut t = Table::default();
        assert!(
            !t.install_placement(placement("a", 1, "x"), 3, None),
            "no intent in memory: nothing to attach it to"
        );
        t.install_intent(intent("a", JobStatus::Running), 2, false);
        assert!(t.install_placement(placement("a", 1, "x"), 3, None));
        let mut newer = placement("a", 1, "x");
        newer.commit = Some("c".into());
        assert!(
            !t.install_placement(placement("a", 1, "x"), 3, None),
            "same write"
        );
        assert!(t.install_placement(newer.clone(), 7, None));
        assert!(
            !t.install_placement(placement("a", 1, "x"), 5, None),
            "older write"
        );
        assert!(
            !t.install_placement(placement("a", 1, "x"), 0, None),
            "a version 1 copy never replaces a stored placement"
        );
        // The next attempt replaces it; the earlier one is remembered by its agent.
        assert!(t.install_placement(placement("a", 2, "y"), 8, None));
        assert!(!t.install_placement(newer, 9, None), "an older attempt");
        let c = &t.placements["a"];
        assert_eq!((c.placement.attempt, c.version), (2, 8));
        assert_eq!(
            c.earlier,
            vec![Placed {
                attempt: 1,
                agent: "x".into()
            }]
        );
    }

    #[test]
    fn finished_records_beyond_the_cap_leave_memory() {
        let mut t = Table::default();
        let n = RECENT_FINISHED + 10;
        for i in 0..n {
            let id = format!("j{i:05}");
            t.install_intent(intent(&id, JobStatus::Succeeded), i as u64 + 1, false);
            t.install_placement(placement(&id, 1, "x"), i as u64 + 1, None);
        }
        t.install_intent(intent("live", JobStatus::Running), 1_000_000, false);
        let kept = t.index.values().filter(|e| e.intent.is_some()).count();
        assert_eq!(kept, RECENT_FINISHED + 1);
        assert_eq!(
            t.placements.len(),
            RECENT_FINISHED,
            "placements leave with their intent"
        );
        assert!(t.index["j00000"].intent.is_none());
        assert!(!t.placements.contains_key("j00000"));
        assert!(t.index[&format!("j{:05}", n - 1)].intent.is_some());
        assert!(t.index["live"].intent.is_some());
        assert_eq!(t.index.len(), n + 1);
        assert_eq!(t.active.len(), 1);
    }

    #[test]
    fn a_repeated_recent_id_keeps_its_record() {
        let mut t = Table::default();
        t.install_intent(intent("a", JobStatus::Succeeded), 1, false);
        for i in 0..RECENT_FINISHED - 1 {
            t.install_intent(
                intent(&format!("x{i:05}"), JobStatus::Failed),
                i as u64 + 10,
                false,
            );
        }
        // "a" changes again while finished: it becomes recent again.
        t.install_intent(intent("a", JobStatus::Succeeded), 100_000, false);
        t.install_intent(intent("y", JobStatus::Failed), 100_001, false);
        assert!(t.index["a"].intent.is_some());
        assert!(t.index["x00000"].intent.is_none());
    }

    #[test]
    fn heads_do_not_replace_newer_entries() {
        let mut t = Table::default();
        t.install_intent(intent("a", JobStatus::Running), 7, false);
        t.install_head(head("a", JobStatus::Succeeded), 6);
        assert_eq!(t.index["a"].status, JobStatus::Running);
        assert!(t.active.contains("a"));
    }

    fn loaded(state: JobState, iv: u64, pv: u64, legacy: bool) -> Loaded {
        Loaded {
            state,
            iv,
            pv,
            legacy,
        }
    }

    #[test]
    fn writes_touch_only_what_changed() {
        let mut s = JobState {
            intent: intent("a", JobStatus::Running),
            placement: Some(placement("a", 1, "x")),
            earlier: vec![],
        };
        s.intent.attempt = 1;
        let cur = loaded(s.clone(), 4, 5, false);
        assert!(writes(&cur, &s).is_empty(), "no change, no write");
        // A report: the placement alone, on its version.
        let mut next = s.clone();
        next.placement
            .as_mut()
            .unwrap()
            .metrics
            .insert("loss".into(), 0.5);
        let w = writes(&cur, &next);
        assert_eq!(w.len(), 1);
        assert_eq!(
            (w[0].0.as_str(), w[0].2),
            ("placements/a/0000000001", Precondition::Version(5))
        );
        // The job finishes: both, in one transaction.
        next.intent.status = JobStatus::Succeeded;
        let w = writes(&cur, &next);
        let keys: Vec<_> = w.iter().map(|w| (w.0.as_str(), w.2)).collect();
        assert_eq!(
            keys,
            [
                ("jobs/a", Precondition::Version(4)),
                ("placements/a/0000000001", Precondition::Version(5))
            ]
        );
        // A new attempt is a new key.
        let mut again = s.clone();
        again.intent.attempt = 2;
        again.placement = Some(placement("a", 2, "y"));
        let w = writes(&cur, &again);
        assert_eq!(w[1].0, "placements/a/0000000002");
        assert_eq!(w[1].2, Precondition::Absent);
        // A version 1 record is rewritten as two records on its next write, whatever changed.
        let legacy = loaded(s.clone(), 4, 0, true);
        let mut next = s.clone();
        next.intent.reason = Some("x".into());
        let w = writes(&legacy, &next);
        let keys: Vec<_> = w.iter().map(|w| (w.0.as_str(), w.2)).collect();
        assert_eq!(
            keys,
            [
                ("jobs/a", Precondition::Version(4)),
                ("placements/a/0000000001", Precondition::Absent)
            ]
        );
        let stored: Intent = serde_json::from_slice(&w[0].1).unwrap();
        assert_eq!(stored.schema_version, INTENT_SCHEMA_VERSION);
    }
}
