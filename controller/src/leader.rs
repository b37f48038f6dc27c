//! Leadership among controllers that share an etcd cluster (groundwork of issue 11: not yet
//! wired into `run`). Each controller campaigns in one etcd election (`<prefix>leader`) with a
//! lease of `ttl`, keeping the lease alive every `ttl / 3`; the winner's election key and its
//! create revision are its [`Fence`], which its writes will compare in the same transaction.
//!
//! Invariants:
//! - A leader steps down (its role becomes `Follower` at once) when its lease has not been
//!   renewed for `2/3 ttl`, before etcd can expire it (etcd expires it no sooner than `ttl`
//!   after the last renewal it answered), so two controllers never both believe they lead
//!   while their clocks run at about the same rate.
//! - A leader whose keep-alive answer says the lease is gone (TTL 0) steps down too.
//! - Cancelling the campaign resigns (best effort, bounded): a standby leads at once instead of
//!   waiting for the lease to expire. A controller that dies without resigning is replaced
//!   once its lease expires (`ttl`).
//! - Followers learn the leader's address (the campaign value) from etcd.

use std::time::{Duration, Instant};

use etcd_client::{Client, ResignOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The default lease: a dead leader is replaced within this plus a campaign round trip.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// Bound on each etcd call the election makes outside the campaign itself.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before campaigning again after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// What the writes of a leader compare: its election key still exists with this create
/// revision (a deposed leader's key is gone or newer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

/// This controller's part in the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Another controller leads (its address when known), or nobody does yet.
    Follower { leader: Option<String> },
    /// This controller leads; its writes carry `fence`.
    Leader { fence: Fence },
}

impl Role {
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }
}

/// Campaigns as `address` in election `name` until `cancel`; the returned channel follows this
/// controller's role.
pub fn campaign(
    client: Client,
    name: String,
    address: String,
    ttl: Duration,
    cancel: CancellationToken,
) -> watch::Receiver<Role> {
    let (tx, rx) = watch::channel(Role::Follower { leader: None });
    tokio::spawn(observe(
        client.clone(),
        name.clone(),
        tx.clone(),
        cancel.clone(),
    ));
    tokio::spawn(async move {
        while !cancel.is_cancelled() {
            if let Err(error) = term(&client, &name, &address, ttl, &tx, &cancel).await {
                warn!(%error, election = %name, "not leading: campaigning again");
            }
            step_down(&tx);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
        step_down(&tx);
    });
    rx
}

fn step_down(tx: &watch::Sender<Role>) {
    tx.send_if_modified(|role| {
        if role.is_leader() {
            *role = Role::Follower { leader: None };
            true
        } else {
            false
        }
    });
}

/// One lease: campaign, lead while it is renewed, return when it is not (or on cancel).
async fn term(
    client: &Client,
    name: &str,
    address: &str,
    ttl: Duration,
    tx: &watch::Sender<Role>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let mut c = client.clone();
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(5);
    let lease = bounded(c.lease_grant(secs, None)).await?.id();
    let (mut keeper, mut answers) = bounded(c.lease_keep_alive(lease)).await?;
    let mut renewed = Instant::now();
    let limit = ttl * 2 / 3;
    let mut tick = tokio::time::interval(ttl / 3);
    let mut elect = client.clone();
    let campaign = elect.campaign(name, address, lease);
    tokio::pin!(campaign);
    let mut fence: Option<Fence> = None;
    let ended = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            r = &mut campaign, if fence.is_none() => {
                let won = r.map_err(|e| format!("campaign: {e}"))?;
                let key = won.leader().ok_or("campaign: no leader key in the answer")?;
                // The election key's own create revision: what a fenced write compares.
                let got = bounded(c.get(key.key(), None)).await?;
                let revision = got
                    .kvs()
                    .first()
                    .map(|kv| kv.create_revision())
                    .ok_or("the election key vanished as it was won")?;
                let f = Fence { key: key.key().to_vec(), revision };
                info!(election = %name, %address, revision, "leading");
                tx.send_replace(Role::Leader { fence: f.clone() });
                fence = Some(f);
            }
            _ = tick.tick() => {
                if renewed.elapsed() > limit {
                    break Err(format!(
                        "lease not renewed for {:?}: stepping down before it can expire",
                        renewed.elapsed()
                    ));
                }
                if let Err(e) = keeper.keep_alive().await {
                    warn!(error = %e, "lease renewal not sent");
                }
            }
            a = answers.message() => match a {
                Ok(Some(r)) if r.ttl() > 0 => renewed = Instant::now(),
                Ok(Some(_)) => break Err("the lease expired".into()),
                Ok(None) => break Err("the lease renewal stream ended".into()),
                Err(e) => break Err(format!("lease renewal: {e}")),
            },
        }
    };
    if ended.is_err() {
        // Step down before anything else: the lease may already be gone.
        step_down(tx);
    }
    // Resign (when leading) and revoke, bounded: a standby need not wait for the lease.
    if let Some(f) = fence {
        let mut c = client.clone();
        let leader = etcd_client::LeaderKey::new()
            .with_name(name)
            .with_key(f.key.clone())
            .with_lease(lease);
        let _ = bounded(c.resign(Some(ResignOptions::new().with_leader(leader)))).await;
    }
    let _ = bounded(c.lease_revoke(lease)).await;
    ended
}

/// Keeps a follower's view of who leads.
async fn observe(client: Client, name: String, tx: watch::Sender<Role>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let mut c = client.clone();
        let stream = match bounded(c.observe(name.as_str())).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut stream = stream;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = stream.message() => m,
            };
            let Ok(Some(answer)) = msg else { break };
            let leader = answer
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
            tx.send_if_modified(|role| match role {
                Role::Follower { leader: known } if *known != leader => {
                    *known = leader.clone();
                    true
                }
                _ => false,
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("etcd did not answer within {CALL_TIMEOUT:?}")),
    }
}
