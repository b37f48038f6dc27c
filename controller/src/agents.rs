//! The agent registry: who is connected, what each offers, and the channel to its session.
//!
//! Observed state is three-valued: connected (a live session), disconnected but within the TTL
//! (unknown: its jobs are kept), and expired (lost: reconcile moves its jobs on). After a
//! controller restart every known agent counts as last seen at the restart, so agents get a full
//! TTL to reconnect before their jobs are declared lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use runyard_model::{AgentInfo, AgentRecord, GpuInfo, Timestamp};
use runyard_proto::v1::ControllerMessage;
use tokio::sync::mpsc;

use crate::reconcile::AgentView;
use crate::store::{Precondition, Store, StoreError};

const PREFIX: &str = "agents/";

#[derive(Clone)]
pub struct Agents {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    agents: Mutex<BTreeMap<String, Entry>>,
    next_session: std::sync::atomic::AtomicU64,
}

struct Entry {
    info: AgentInfo,
    session: Option<(u64, mpsc::Sender<ControllerMessage>)>,
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
        Ok(Agents {
            inner: Arc::new(Inner {
                store,
                agents: Mutex::new(agents),
                next_session: 1.into(),
            }),
        })
    }

    /// Registers a live session, replacing any older session of the same agent.
    pub async fn connect(&self, mut info: AgentInfo, tx: mpsc::Sender<ControllerMessage>) -> u64 {
        let id = self
            .inner
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info.connected = true;
        let name = info.name.clone();
        self.inner.agents.lock().unwrap().insert(
            name,
            Entry {
                info: info.clone(),
                session: Some((id, tx)),
            },
        );
        self.persist(&info).await;
        id
    }

    /// Ends a session, unless a newer one replaced it.
    pub async fn disconnect(&self, name: &str, session: u64, now: Timestamp) {
        let info = {
            let mut agents = self.inner.agents.lock().unwrap();
            match agents.get_mut(name) {
                Some(e) if e.session.as_ref().is_some_and(|(id, _)| *id == session) => {
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

    /// Sends to the agent's live session; false if it has none or it is gone.
    pub fn send(&self, name: &str, msg: ControllerMessage) -> bool {
        let tx = self
            .inner
            .agents
            .lock()
            .unwrap()
            .get(name)
            .and_then(|e| e.session.as_ref().map(|(_, tx)| tx.clone()));
        match tx {
            Some(tx) => tx.try_send(msg).is_ok(),
            None => false,
        }
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
