//! The agent registry: who is enrolled, who is connected, what each offers, and the channel to
//! its session.
//!
//! Observed state is three-valued: connected (a live session), disconnected but within the TTL
//! (unknown: its jobs are kept), and expired (lost: reconcile moves its jobs on). After a
//! controller restart every known agent counts as last seen at the restart, so agents get a full
//! TTL to reconnect before their jobs are declared lost.
//!
//! Identity: an agent enrols once, with the join token and a credential of its own; the store
//! keeps only the credential's sha256 (`agent-credentials/<name>`, next to `agents/<name>`).
//! From then on the name opens a session only with that credential, so a second agent cannot
//! take a name over. One agent has at most one live session: a new session of the same agent
//! first ends the old one and waits for it to finish (`claim`).
//!
//! Delivery: `send` never drops a message for a live session. What does not fit in the session's
//! channel waits in the session's backlog, in order, and the session's `forward` loop moves it
//! into the channel as room appears (back-pressure without blocking the reconcile loop).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use runyard_model::{AgentInfo, AgentRecord, GpuInfo, Timestamp};
use runyard_proto::v1::ControllerMessage;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::reconcile::AgentView;
use crate::store::{Precondition, Store, StoreError};
use crate::tokens::{credential_hash, token_eq};

const PREFIX: &str = "agents/";
const CREDENTIALS: &str = "agent-credentials/";

#[derive(Clone)]
pub struct Agents {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    agents: Mutex<BTreeMap<String, Entry>>,
    /// sha256 (hex) of each enrolled agent's credential.
    credentials: Mutex<BTreeMap<String, String>>,
    /// Per agent name: the session turn and the token of the newest claim.
    turns: Mutex<BTreeMap<String, Turn>>,
    next_session: std::sync::atomic::AtomicU64,
    /// The address each agent's latest session came from: where a service replica on it may
    /// be reached directly.
    addresses: Mutex<BTreeMap<String, std::net::IpAddr>>,
}

struct Entry {
    info: AgentInfo,
    session: Option<Live>,
}

/// A live session as the registry holds it.
struct Live {
    id: u64,
    tx: mpsc::Sender<ControllerMessage>,
    /// Messages that did not fit in `tx` yet, oldest first.
    backlog: VecDeque<ControllerMessage>,
    wake: Arc<Notify>,
    /// Ends the session (a newer session of the agent, or the agent's removal).
    cancel: CancellationToken,
}

struct Turn {
    lock: Arc<tokio::sync::Mutex<()>>,
    current: CancellationToken,
}

/// Why a session or an upload is refused; the message is shown to the agent's operator.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(
        "agent name `{0}` is already enrolled by another agent, and this agent did not present \
         that agent's credential (agent.credential in its data dir): start this agent with \
         another --name, or, if the old agent is gone for good, have an admin remove it first \
         (DELETE /api/v1/agents/{0} with the admin token; see README, Agents)"
    )]
    NameTaken(String),
    #[error(
        "agent `{0}` is not enrolled and the join token is missing or wrong: pass the \
         controller's agent.token with --token-file"
    )]
    JoinToken(String),
    #[error("agent `{0}` sent no credential: upgrade the agent (it enrols with one by itself)")]
    NoCredential(String),
    #[error("cannot record the agent's enrolment; retry")]
    Store(#[source] StoreError),
}

impl Agents {
    pub async fn load(store: Arc<dyn Store>, now: Timestamp) -> Result<Agents, StoreError> {
        let mut agents = BTreeMap::new();
        for (_, v) in store.list(PREFIX).await? {
            if let Ok(AgentRecord { mut info, .. }) = serde_json::from_slice(&v.value) {
                info.connected = false;
                info.last_seen = info.last_seen.max(now);
                agents.insert(
                    info.name.clone(),
                    Entry {
                        info,
                        session: None,
                    },
                );
            }
        }
        let mut credentials = BTreeMap::new();
        for (key, v) in store.list(CREDENTIALS).await? {
            let name = key.strip_prefix(CREDENTIALS).unwrap_or(&key).to_string();
            credentials.insert(name, String::from_utf8_lossy(&v.value).into_owned());
        }
        Ok(Agents {
            inner: Arc::new(Inner {
                store,
                agents: Mutex::new(agents),
                credentials: Mutex::new(credentials),
                turns: Mutex::new(BTreeMap::new()),
                next_session: 1.into(),
                addresses: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Lets `name` in: with its enrolled credential, or, for a name not enrolled yet, with the
    /// join token, enrolling `credential`. Returns whether the agent was enrolled just now.
    pub async fn admit(
        &self,
        name: &str,
        credential: Option<&str>,
        join_token_ok: bool,
    ) -> Result<bool, AdmitError> {
        if self.verify(name, credential) {
            return Ok(false);
        }
        if self.is_enrolled(name) {
            return Err(AdmitError::NameTaken(name.into()));
        }
        if !join_token_ok {
            return Err(AdmitError::JoinToken(name.into()));
        }
        let Some(credential) = credential.filter(|c| !c.is_empty()) else {
            return Err(AdmitError::NoCredential(name.into()));
        };
        let hash = credential_hash(credential);
        match self
            .inner
            .store
            .put(
                &format!("{CREDENTIALS}{name}"),
                hash.clone().into_bytes(),
                Precondition::Absent,
            )
            .await
        {
            Ok(_) => {
                self.inner
                    .credentials
                    .lock()
                    .unwrap()
                    .insert(name.into(), hash);
                Ok(true)
            }
            // Another agent enrolled the name meanwhile.
            Err(StoreError::Conflict { .. }) => Err(AdmitError::NameTaken(name.into())),
            Err(e) => Err(AdmitError::Store(e)),
        }
    }

    /// The name is enrolled and `credential` is its credential.
    pub fn verify(&self, name: &str, credential: Option<&str>) -> bool {
        let stored = self.inner.credentials.lock().unwrap().get(name).cloned();
        match (stored, credential) {
            (Some(hash), Some(c)) => token_eq(&credential_hash(c), &hash),
            _ => false,
        }
    }

    pub fn is_enrolled(&self, name: &str) -> bool {
        self.inner.credentials.lock().unwrap().contains_key(name)
    }

    /// Forgets an agent: ends its session and removes its record and its enrolment, so the name
    /// can be enrolled again. Its jobs are lost after the TTL like those of any silent agent.
    /// Returns whether the agent was known.
    pub async fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let entry = self.inner.agents.lock().unwrap().remove(name);
        if let Some(turn) = self.inner.turns.lock().unwrap().get(name) {
            turn.current.cancel();
        }
        let enrolled = self.inner.credentials.lock().unwrap().remove(name);
        self.inner.store.delete(&format!("{PREFIX}{name}")).await?;
        self.inner
            .store
            .delete(&format!("{CREDENTIALS}{name}"))
            .await?;
        Ok(entry.is_some() || enrolled.is_some())
    }

    /// Claims the agent's next session: ends the live session and any session still waiting
    /// for its turn, and returns the turn to hold from before `connect` until after
    /// `disconnect` and the token that ends this session in turn. So one agent never has two
    /// sessions serving at once, and the newest always wins.
    pub fn claim(&self, name: &str) -> (Arc<tokio::sync::Mutex<()>>, CancellationToken) {
        let mut turns = self.inner.turns.lock().unwrap();
        let turn = turns.entry(name.to_string()).or_insert_with(|| Turn {
            lock: Arc::default(),
            current: CancellationToken::new(),
        });
        turn.current.cancel();
        turn.current = CancellationToken::new();
        (turn.lock.clone(), turn.current.clone())
    }

    /// Notes the address `name`'s session comes from.
    pub fn note_address(&self, name: &str, ip: std::net::IpAddr) {
        self.inner
            .addresses
            .lock()
            .unwrap()
            .insert(name.to_string(), ip);
    }

    /// `name` is not to be dialed directly.
    pub fn forget_address(&self, name: &str) {
        self.inner.addresses.lock().unwrap().remove(name);
    }

    /// The address `name`'s latest session came from.
    pub fn address(&self, name: &str) -> Option<std::net::IpAddr> {
        self.inner.addresses.lock().unwrap().get(name).copied()
    }

    /// Registers a live session, ended by `cancel` (from `claim`); call it holding the turn.
    pub async fn connect(
        &self,
        mut info: AgentInfo,
        tx: mpsc::Sender<ControllerMessage>,
        cancel: CancellationToken,
    ) -> u64 {
        let id = self
            .inner
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info.connected = true;
        let name = info.name.clone();
        let old = self.inner.agents.lock().unwrap().insert(
            name,
            Entry {
                info: info.clone(),
                session: Some(Live {
                    id,
                    tx,
                    backlog: VecDeque::new(),
                    wake: Arc::new(Notify::new()),
                    cancel,
                }),
            },
        );
        if let Some(live) = old.and_then(|e| e.session) {
            // Only reachable without the turn; end it all the same.
            live.cancel.cancel();
        }
        self.persist(&info).await;
        id
    }

    /// Ends a session, unless a newer one replaced it.
    pub async fn disconnect(&self, name: &str, session: u64, now: Timestamp) {
        let info = {
            let mut agents = self.inner.agents.lock().unwrap();
            match agents.get_mut(name) {
                Some(e) if e.session.as_ref().is_some_and(|l| l.id == session) => {
                    e.session = None;
                    e.info.connected = false;
                    e.info.last_seen = now;
                    Some(e.info.clone())
                }
                _ => None,
            }
        };
        if let Some(info) = info {
            self.persist(&info).await;
        }
    }

    pub fn heartbeat(&self, name: &str, gpus: Vec<GpuInfo>, now: Timestamp) {
        if let Some(e) = self.inner.agents.lock().unwrap().get_mut(name) {
            e.info.last_seen = now;
            if !gpus.is_empty() {
                e.info.gpus = gpus;
            }
        }
    }

    /// When the agent was last heard from.
    pub fn last_seen(&self, name: &str) -> Option<Timestamp> {
        let agents = self.inner.agents.lock().unwrap();
        agents.get(name).map(|e| e.info.last_seen)
    }

    /// Queues a command to the agent's live session, as its wire message; false if it has none.
    pub fn command(&self, name: &str, cmd: &runyard_model::AgentCommand) -> bool {
        self.send(name, runyard_proto::command_to_wire(cmd))
    }

    /// Queues a message to the agent's live session; false if it has none. Never drops a
    /// message for a live session: what does not fit waits for `forward`, in order.
    pub fn send(&self, name: &str, msg: ControllerMessage) -> bool {
        let mut agents = self.inner.agents.lock().unwrap();
        let Some(live) = agents.get_mut(name).and_then(|e| e.session.as_mut()) else {
            return false;
        };
        let msg = if live.backlog.is_empty() {
            match live.tx.try_send(msg) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(m)) => m,
            }
        } else {
            msg
        };
        live.backlog.push_back(msg);
        live.wake.notify_one();
        true
    }

    /// Moves session `id`'s backlog into its channel as room appears; returns when the channel
    /// closes or the session is no longer the agent's live one. Run it for the session's life.
    pub async fn forward(&self, name: &str, id: u64) {
        let Some((tx, wake)) = self.live(name, id, |l| (l.tx.clone(), l.wake.clone())) else {
            return;
        };
        loop {
            wake.notified().await;
            loop {
                // Hold room first, so a message popped is never held outside the backlog while
                // `send` puts a newer one straight into the channel.
                let Ok(permit) = tx.reserve().await else {
                    return;
                };
                match self.live(name, id, |l| l.backlog.pop_front()) {
                    None => return,
                    Some(Some(m)) => permit.send(m),
                    Some(None) => break,
                }
            }
        }
    }

    fn live<T>(&self, name: &str, id: u64, f: impl FnOnce(&mut Live) -> T) -> Option<T> {
        let mut agents = self.inner.agents.lock().unwrap();
        let live = agents.get_mut(name)?.session.as_mut()?;
        (live.id == id).then(|| f(live))
    }

    pub fn views(&self) -> Vec<AgentView> {
        self.inner
            .agents
            .lock()
            .unwrap()
            .values()
            .map(|e| AgentView {
                name: e.info.name.clone(),
                connected: e.session.is_some(),
                last_seen: e.info.last_seen,
                cpu_small_slots: e.info.cpu_small_slots,
                gpus: e.info.gpus.iter().map(|g| g.index).collect(),
            })
            .collect()
    }

    pub fn list(&self) -> Vec<AgentInfo> {
        self.inner
            .agents
            .lock()
            .unwrap()
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    async fn persist(&self, info: &AgentInfo) {
        let value =
            serde_json::to_vec(&AgentRecord::new(info.clone())).expect("agent info serializes");
        if let Err(error) = self
            .inner
            .store
            .put(&format!("{PREFIX}{}", info.name), value, Precondition::Any)
            .await
        {
            tracing::warn!(agent = %info.name, %error, "cannot record agent in the store");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use runyard_proto::v1::{self, controller_message::Msg};

    use super::*;

    async fn agents() -> (tempfile::TempDir, Agents) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open("file:", dir.path()).await.unwrap();
        let agents = Agents::load(store, Timestamp::now()).await.unwrap();
        (dir, agents)
    }

    fn info(name: &str) -> AgentInfo {
        AgentInfo {
            name: name.into(),
            connected: false,
            cpu_small_slots: 1,
            gpus: vec![],
            cpus: 1,
            memory_bytes: 0,
            version: String::new(),
            last_seen: Timestamp::now(),
            jobs: vec![],
        }
    }

    fn release(n: u32) -> ControllerMessage {
        ControllerMessage {
            msg: Some(Msg::Release(v1::Release {
                job_id: "j".into(),
                attempt: n,
            })),
        }
    }

    /// Regression: `send` used `try_send` and dropped what did not fit (an assignment lost, its
    /// job stuck in `scheduled`).
    #[tokio::test]
    async fn a_full_session_channel_delays_messages_but_never_drops_them() {
        let (_dir, agents) = agents().await;
        let (tx, mut rx) = mpsc::channel(1);
        let (_turn, cancel) = agents.claim("a");
        let id = agents.connect(info("a"), tx, cancel).await;
        for n in 1..=5 {
            assert!(agents.send("a", release(n)), "message {n} accepted");
        }
        let forward = agents.forward("a", id);
        let receive = async {
            let mut got = Vec::new();
            while got.len() < 5 {
                match rx.recv().await.and_then(|m| m.msg) {
                    Some(Msg::Release(r)) => got.push(r.attempt),
                    other => panic!("unexpected {other:?}"),
                }
            }
            got
        };
        let got = tokio::select! {
            got = receive => got,
            _ = forward => panic!("forward ended early"),
        };
        assert_eq!(got, vec![1, 2, 3, 4, 5], "all delivered, in order");
    }

    #[tokio::test]
    async fn a_name_is_enrolled_once_and_then_needs_its_credential() {
        let (_dir, agents) = agents().await;
        assert!(matches!(
            agents.admit("a", Some("c1"), false).await,
            Err(AdmitError::JoinToken(_))
        ));
        assert!(matches!(
            agents.admit("a", None, true).await,
            Err(AdmitError::NoCredential(_))
        ));
        assert!(
            agents.admit("a", Some("c1"), true).await.unwrap(),
            "enrolled"
        );
        assert!(!agents.admit("a", Some("c1"), false).await.unwrap());
        for (cred, join) in [(Some("c2"), true), (None, true), (Some("c2"), false)] {
            let err = agents.admit("a", cred, join).await.unwrap_err();
            assert!(matches!(err, AdmitError::NameTaken(_)), "{err}");
            assert!(err.to_string().contains("--name"), "{err}");
        }
        assert!(agents.remove("a").await.unwrap());
        assert!(agents.admit("a", Some("c2"), true).await.unwrap(), "again");
    }

    /// Regression: `connect` replaced the old session without ending it, and the old one's
    /// `disconnect` must not mark the new one disconnected.
    #[tokio::test]
    async fn a_new_session_ends_the_old_one() {
        let (_dir, agents) = agents().await;
        let (tx1, _rx1) = mpsc::channel(4);
        let (turn1, cancel1) = agents.claim("a");
        let guard1 = turn1.lock_owned().await;
        let old = agents.connect(info("a"), tx1, cancel1.clone()).await;
        // A second claim ends the first session and waits for its turn.
        let (turn2, cancel2) = agents.claim("a");
        assert!(cancel1.is_cancelled());
        let mut waiting = Box::pin(turn2.lock_owned());
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "one session at a time"
        );
        agents.disconnect("a", old, Timestamp::now()).await;
        drop(guard1);
        let _guard2 = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap();
        let (tx2, mut rx2) = mpsc::channel(4);
        let new = agents.connect(info("a"), tx2, cancel2.clone()).await;
        // The old session's late disconnect leaves the new one connected.
        agents.disconnect("a", old, Timestamp::now()).await;
        assert!(agents.views()[0].connected, "the new session stays");
        assert!(agents.send("a", release(1)));
        let got = tokio::time::timeout(Duration::from_secs(5), rx2.recv()).await;
        assert!(got.unwrap().is_some());
        assert!(!cancel2.is_cancelled());
        assert_ne!(old, new);
    }
}
