//! Custom scaling policies: the controller asks the agent of one ready replica to call the
//! service's `file.py:function` in that replica's environment (about once a second per
//! service), and keeps the latest answer for the autoscaler. Answers are taken only from the
//! agent asked, for the call it was asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runyard_model::AgentCommand;
use tokio::sync::oneshot;
use tracing::debug;

use super::autoscale::Load;

/// How often a service's policy is called.
pub const PERIOD: Duration = Duration::from_secs(1);
/// An answer older than this is not used (the default policy applies).
pub const FRESH: Duration = Duration::from_secs(5);
/// How long the controller waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// The latest call of one service's policy.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub at: Instant,
    pub result: Result<i64, String>,
}

/// A call waiting for its answer: the agent asked, and the waiter.
type Waiting = (String, oneshot::Sender<Result<i64, String>>);

#[derive(Default)]
pub struct Policies {
    /// Calls waiting for their answer, by request id.
    pending: Mutex<HashMap<String, Waiting>>,
    /// Per service: the latest outcome, and whether a call is out.
    latest: Mutex<HashMap<String, (Option<Outcome>, bool)>>,
}

impl Policies {
    /// An agent's answer; ignored unless that agent was asked that call.
    pub fn answer(&self, agent: &str, request_id: &str, result: Result<i64, String>) {
        let mut pending = self.pending.lock().unwrap();
        match pending.get(request_id) {
            Some((asked, _)) if asked == agent => {
                if let Some((_, tx)) = pending.remove(request_id) {
                    let _ = tx.send(result);
                }
            }
            _ => {
                tracing::warn!(%agent, %request_id, "ignored a policy answer nobody asked this agent for")
            }
        }
    }

    /// The latest answer, if fresh.
    pub fn fresh(&self, service: &str) -> Option<Outcome> {
        self.latest
            .lock()
            .unwrap()
            .get(service)
            .and_then(|(o, _)| o.clone())
            .filter(|o| o.at.elapsed() <= FRESH)
    }

    /// Starts a call when the last one is older than `PERIOD` and none is out.
    #[allow(clippy::too_many_arguments)]
    pub fn maybe_call(
        self: &Arc<Self>,
        agents: &crate::agents::Agents,
        service: &str,
        policy: &str,
        agent: &str,
        job: &str,
        attempt: u32,
        load: Load,
        extra: serde_json::Value,
    ) {
        {
            let mut latest = self.latest.lock().unwrap();
            let entry = latest.entry(service.to_string()).or_insert((None, false));
            let due = entry.0.as_ref().is_none_or(|o| o.at.elapsed() >= PERIOD);
            if entry.1 || !due {
                return;
            }
            entry.1 = true;
        }
        let mut metrics = serde_json::json!({
            "pending_requests": load.pending_requests,
            "pending_works": load.pending_works,
        });
        if let (Some(m), Some(e)) = (metrics.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        let input = serde_json::json!({"replicas": load.replicas, "metrics": metrics}).to_string();
        let request_id = ulid::Ulid::new().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap()
            .insert(request_id.clone(), (agent.to_string(), tx));
        agents.command(
            agent,
            &AgentCommand::Evaluate {
                request_id: request_id.clone(),
                job_id: job.into(),
                attempt,
                policy: policy.into(),
                input,
            },
        );
        let this = self.clone();
        let service = service.to_string();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => Err(format!(
                    "the policy gave no answer within {ANSWER_TIMEOUT:?}"
                )),
            };
            this.pending.lock().unwrap().remove(&request_id);
            debug!(%service, ?result, "policy called");
            this.latest.lock().unwrap().insert(
                service,
                (
                    Some(Outcome {
                        at: Instant::now(),
                        result,
                    }),
                    false,
                ),
            );
        });
    }

    pub fn forget(&self, service: &str) {
        self.latest.lock().unwrap().remove(service);
    }
}
