//! MLflow's tracking REST API (`/api/2.0/mlflow/...`), the calls Runyard makes: experiments by
//! name, runs created, read, tagged, given parameters and ended. Translates; decides nothing.
//! Credentials are MLflow's own variables in the controller's environment:
//! `MLFLOW_TRACKING_TOKEN` (bearer), or `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

/// One call's limit: a tracking server that does not answer must not hold a submit for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// The server answered with an error (`RESOURCE_DOES_NOT_EXIST`, ...).
    #[error("MLflow at {uri} answered {status}: {message}")]
    Api {
        uri: String,
        status: u16,
        code: String,
        message: String,
    },
    /// It could not be reached or did not answer in time.
    #[error("MLflow at {uri} cannot be reached: {message}")]
    Unreachable { uri: String, message: String },
}

impl MlflowError {
    pub fn is_missing(&self) -> bool {
        matches!(self, MlflowError::Api { code, status, .. } if code == "RESOURCE_DOES_NOT_EXIST" || *status == 404)
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    auth: Auth,
}

#[derive(Clone, Debug, Default)]
enum Auth {
    #[default]
    None,
    Bearer(String),
    Basic(String, String),
}

/// What a run's info says.
#[derive(Clone, Debug, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    #[serde(default)]
    pub status: String,
}

impl Client {
    /// A client with the credentials of the controller's environment.
    pub fn from_env() -> Client {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let auth = match (
            var("MLFLOW_TRACKING_TOKEN"),
            var("MLFLOW_TRACKING_USERNAME"),
            var("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(t), _, _) => Auth::Bearer(t),
            (None, Some(u), Some(p)) => Auth::Basic(u, p),
            _ => Auth::None,
        };
        Client {
            http: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .build()
                .expect("a plain HTTP client builds"),
            auth,
        }
    }

    async fn call(
        &self,
        uri: &str,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", uri.trim_end_matches('/'));
        let mut req = self.http.request(method, &url).query(query);
        req = match &self.auth {
            Auth::None => req,
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        let unreachable = |e: reqwest::Error| MlflowError::Unreachable {
            uri: uri.to_string(),
            message: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let field = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
            return Err(MlflowError::Api {
                uri: uri.to_string(),
                status: status.as_u16(),
                code: field("error_code").unwrap_or_default(),
                message: field("message").unwrap_or_else(|| text.chars().take(300).collect()),
            });
        }
        Ok(value)
    }

    async fn experiment_by_name(&self, uri: &str, name: &str) -> Result<String, MlflowError> {
        let v = self
            .call(
                uri,
                reqwest::Method::GET,
                "experiments/get-by-name",
                &[("experiment_name", name)],
                None,
            )
            .await?;
        string_at(uri, &v, "/experiment/experiment_id")
    }

    /// The id of experiment `name`, made when missing.
    pub async fn experiment_named(&self, uri: &str, name: &str) -> Result<String, MlflowError> {
        match self.experiment_by_name(uri, name).await {
            Err(e) if e.is_missing() => {
                let made = self
                    .call(
                        uri,
                        reqwest::Method::POST,
                        "experiments/create",
                        &[],
                        Some(json!({ "name": name })),
                    )
                    .await;
                match made {
                    Ok(v) => string_at(uri, &v, "/experiment_id"),
                    // Made meanwhile by someone else.
                    Err(MlflowError::Api { code, .. }) if code == "RESOURCE_ALREADY_EXISTS" => {
                        self.experiment_by_name(uri, name).await
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    pub async fn get_run(&self, uri: &str, run_id: &str) -> Result<RunInfo, MlflowError> {
        let v = self
            .call(
                uri,
                reqwest::Method::GET,
                "runs/get",
                &[("run_id", run_id)],
                None,
            )
            .await?;
        info_of(uri, &v)
    }

    /// A new run (RUNNING), started `start_ms`, with `tags`.
    pub async fn create_run(
        &self,
        uri: &str,
        experiment_id: &str,
        run_name: &str,
        start_ms: u64,
        tags: &[(String, String)],
    ) -> Result<RunInfo, MlflowError> {
        let v = self
            .call(
                uri,
                reqwest::Method::POST,
                "runs/create",
                &[],
                Some(json!({
                    "experiment_id": experiment_id,
                    "run_name": run_name,
                    "start_time": start_ms,
                    "tags": key_values(tags),
                })),
            )
            .await?;
        info_of(uri, &v)
    }

    /// Logs parameters and tags in one call. A parameter logged again with the same value is
    /// accepted by MLflow; a different value is an error.
    pub async fn log_batch(
        &self,
        uri: &str,
        run_id: &str,
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<(), MlflowError> {
        self.call(
            uri,
            reqwest::Method::POST,
            "runs/log-batch",
            &[],
            Some(json!({
                "run_id": run_id,
                "params": key_values(params),
                "tags": key_values(tags),
            })),
        )
        .await
        .map(drop)
    }

    /// Ends a run: `FINISHED`, `FAILED` or `KILLED`, at `end_ms`.
    pub async fn end_run(
        &self,
        uri: &str,
        run_id: &str,
        status: &str,
        end_ms: u64,
    ) -> Result<(), MlflowError> {
        self.call(
            uri,
            reqwest::Method::POST,
            "runs/update",
            &[],
            Some(json!({ "run_id": run_id, "status": status, "end_time": end_ms })),
        )
        .await
        .map(drop)
    }
}

fn string_at(uri: &str, v: &Value, ptr: &str) -> Result<String, MlflowError> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| MlflowError::Api {
            uri: uri.to_string(),
            status: 200,
            code: String::new(),
            message: format!("no {ptr} in its answer"),
        })
}

fn key_values(kv: &[(String, String)]) -> Vec<Value> {
    kv.iter()
        .map(|(k, v)| json!({ "key": k, "value": v }))
        .collect()
}

fn info_of(uri: &str, v: &Value) -> Result<RunInfo, MlflowError> {
    v.pointer("/run/info")
        .cloned()
        .and_then(|i| serde_json::from_value(i).ok())
        .ok_or_else(|| MlflowError::Api {
            uri: uri.to_string(),
            status: 200,
            code: String::new(),
            message: "no run info in its answer".into(),
        })
}
