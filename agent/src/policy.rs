//! Runs a service's scaling policy (`file.py:function` in its repository) for the controller,
//! in the environment of one of the service's replicas: its interpreter, working directory,
//! environment and user, as a short process of its own (its own marker and process group, so
//! ending it never touches the replica), bounded in time.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::attempts::Attempt;
use crate::process::{JobProcess, ProcessSpec};

/// How long one call may take.
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of output kept from a policy call (what it prints besides its answer is dropped).
const MAX_LINES: usize = 200;
/// The line that carries the answer.
const ANSWER: &str = "RUNYARD_POLICY ";

/// Loads the file by path (from the checkout, which is the working directory), calls the
/// function with `replicas` and `metrics`, and prints one answer line.
const RUNNER: &str = r#"import importlib.util, json, os, sys
path, name = sys.argv[1], sys.argv[2]
def answer(**kw):
    print("RUNYARD_POLICY " + json.dumps(kw), flush=True)
def call():
    if not os.path.isfile(path):
        return answer(error=f"autoscale.policy: `{path}` is not a file in the repository")
    sys.path.insert(0, os.getcwd())
    spec = importlib.util.spec_from_file_location("runyard_policy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        return answer(error=f"autoscale.policy: `{path}` has no function `{name}`")
    given = json.loads(os.environ["RUNYARD_POLICY_INPUT"])
    value = fn(given["replicas"], given["metrics"])
    if isinstance(value, bool) or not isinstance(value, int):
        return answer(error=f"{name}() returned {value!r}, not an int")
    answer(value=value)
try:
    call()
except BaseException as e:
    answer(error=f"{name}() raised {type(e).__name__}: {e}")
"#;

/// Calls `policy` with `input` (`{"replicas": N, "metrics": {...}}`) in attempt `a`'s
/// environment; the policy's answer, or why there is none.
pub async fn evaluate(a: &Attempt, policy: &str, input: &str) -> Result<i64, String> {
    let base = a
        .runtime
        .get()
        .ok_or_else(|| "the replica has not started its process yet".to_string())?;
    let (file, function) = runyard_model::service::parse_policy(policy)
        .map_err(|m| format!("autoscale.policy: {m}"))?;
    let mut spec: ProcessSpec = base.clone();
    spec.args = vec![
        "-I".into(),
        "-c".into(),
        RUNNER.into(),
        file.into(),
        function.into(),
    ];
    spec.env.push(("RUNYARD_POLICY_INPUT".into(), input.into()));
    // Its own marker: the replica's sweep must not take it, and its end must not take the
    // replica. No cgroup: removing it at the end would remove the replica's.
    spec.marker = format!("{}/policy", base.marker);
    spec.cgroup = None;
    // The uid is the replica's, which runs: sweeping it before exec would kill the replica.
    if let Some(r) = spec.run_as.as_mut() {
        r.sweep = false;
    }
    let (tx, mut rx) = mpsc::channel::<Vec<String>>(16);
    let mut proc =
        JobProcess::spawn(spec, tx).map_err(|e| format!("cannot start the policy: {e}"))?;
    let collect = async {
        let mut kept = Vec::new();
        while let Some(batch) = rx.recv().await {
            for line in batch {
                if kept.len() < MAX_LINES || line.starts_with(ANSWER) {
                    kept.push(line);
                }
            }
        }
        kept
    };
    let run = async {
        tokio::select! {
            _ = proc.wait() => None,
            _ = tokio::time::sleep(POLICY_TIMEOUT) => {
                proc.stop(Duration::from_millis(500)).await;
                Some(format!("the policy did not answer within {POLICY_TIMEOUT:?}"))
            }
        }
    };
    let (lines, timed_out) = tokio::join!(collect, run);
    if let Some(why) = timed_out {
        return Err(why);
    }
    let Some(answer) = lines.iter().rev().find_map(|l| l.strip_prefix(ANSWER)) else {
        let tail: Vec<&str> = lines.iter().rev().take(3).map(String::as_str).collect();
        return Err(format!(
            "the policy gave no answer (last output: {})",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    };
    let v: serde_json::Value =
        serde_json::from_str(answer).map_err(|e| format!("unreadable policy answer: {e}"))?;
    match (
        v.get("value").and_then(serde_json::Value::as_i64),
        v.get("error"),
    ) {
        (Some(n), _) => Ok(n),
        (None, Some(e)) => Err(e
            .as_str()
            .unwrap_or("policy error")
            .chars()
            .take(1000)
            .collect()),
        _ => Err("unreadable policy answer".into()),
    }
}
