//! The server against its own document: fetch `/api/v1/openapi.json` from a real controller,
//! send every documented operation valid and invalid requests (a real job's id and unknown ids,
//! bad query values, a wrong method, no token, an oversized body), and check each reply: no
//! 5xx, its status is documented for the operation, its content type is documented for that
//! status, and a JSON body validates against the documented schema (JSON Schema 2020-12, `$ref`s
//! resolved into the document's components).

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use reqwest::Method;
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

/// One documented operation.
struct Operation {
    method: Method,
    path: String,
    /// `responses` of the operation, `$ref`s to components resolved.
    responses: serde_json::Map<String, Value>,
    secured: bool,
    /// It documents a request body.
    takes_body: bool,
    query: Vec<String>,
}

fn operations(doc: &Value) -> anyhow::Result<Vec<Operation>> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().context("paths")? {
        for (method, op) in item.as_object().context("path item")? {
            let mut responses = serde_json::Map::new();
            for (status, r) in op["responses"].as_object().context("responses")? {
                responses.insert(status.clone(), resolve(doc, r)?);
            }
            let query = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect();
            ops.push(Operation {
                method: method.to_uppercase().parse()?,
                path: path.clone(),
                responses,
                secured: op["security"].as_array().is_some_and(|s| !s.is_empty()),
                takes_body: op.get("requestBody").is_some(),
                query,
            });
        }
    }
    Ok(ops)
}

/// A `{"$ref": "#/components/..."}` replaced by what it points to.
fn resolve(doc: &Value, v: &Value) -> anyhow::Result<Value> {
    match v["$ref"].as_str() {
        Some(r) => {
            let pointer = r.strip_prefix('#').context("only local refs")?;
            Ok(doc
                .pointer(pointer)
                .with_context(|| format!("dangling {r}"))?
                .clone())
        }
        None => Ok(v.clone()),
    }
}

/// Checks one reply against the operation's documented responses.
fn check(
    doc: &Value,
    op: &Operation,
    status: u16,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> anyhow::Result<()> {
    let what = format!("{} {} -> {status}", op.method, op.path);
    ensure!(status < 500, "{what}: a server error");
    let Some(response) = op.responses.get(&status.to_string()) else {
        bail!(
            "{what}: status not documented (documented: {:?})",
            op.responses.keys().collect::<Vec<_>>()
        );
    };
    let Some(content) = response["content"].as_object() else {
        ensure!(
            body.is_none_or(<[u8]>::is_empty),
            "{what}: a body where none is documented"
        );
        return Ok(());
    };
    let media = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
        .with_context(|| format!("{what}: no content type"))?;
    let Some(documented) = content.get(&media) else {
        bail!(
            "{what}: content type {media} not documented (documented: {:?})",
            content.keys().collect::<Vec<_>>()
        );
    };
    if media != "application/json" {
        return Ok(());
    }
    let body = body.with_context(|| format!("{what}: JSON body not read"))?;
    let instance: Value = serde_json::from_slice(body).with_context(|| {
        format!(
            "{what}: body is not JSON: {}",
            String::from_utf8_lossy(body)
        )
    })?;
    validate(doc, &documented["schema"], &instance).with_context(|| what.clone())
}

/// Validates `instance` against `schema`, whose `$ref`s point into `doc`'s components.
fn validate(doc: &Value, schema: &Value, instance: &Value) -> anyhow::Result<()> {
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "allOf": [schema],
    });
    let validator = jsonschema::draft202012::new(&root)
        .map_err(|e| anyhow::anyhow!("the documented schema is invalid: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    ensure!(
        errors.is_empty(),
        "body does not match the documented schema: {errors:?}\nbody: {instance}"
    );
    Ok(())
}

struct Probe<'a> {
    c: &'a TestCluster,
    doc: &'a Value,
    checked: usize,
}

impl Probe<'_> {
    /// Sends one request and checks the reply.
    async fn send(
        &mut self,
        op: &Operation,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        token: bool,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<u16> {
        let mut req = self
            .c
            .client
            .request(method.clone(), format!("{}{path}", self.c.base_url()))
            .query(query);
        if token {
            req = req.bearer_auth(&self.c.token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path} {query:?}"))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Only JSON bodies are checked further; others may be streams that never end (events,
        // a pending job's followed log).
        let json = content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json"));
        let body = if !json {
            None
        } else {
            Some(
                tokio::time::timeout(LONG, resp.bytes())
                    .await
                    .with_context(|| format!("{method} {path}: body did not end"))??
                    .to_vec(),
            )
        };
        check(
            self.doc,
            op,
            status,
            content_type.as_deref(),
            body.as_deref(),
        )
        .with_context(|| format!("request: {method} {path} {query:?} token={token}"))?;
        if method == op.method {
            ensure!(
                (status == 401) == (op.secured && !token),
                "{method} {path}: {status}, but the operation is secured: {}, token sent: {token}",
                op.secured
            );
        }
        self.checked += 1;
        Ok(status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("hello.py", "print('hello')\n")])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    // The document needs no token.
    let r = c
        .client
        .get(format!("{}/api/v1/openapi.json", c.base_url()))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await?;
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let ops = operations(&doc)?;
    assert_eq!(ops.len(), 30, "every route is documented");

    // A finished job, and one that stays pending (no agent has a GPU).
    let done = c
        .submit(json!({"repo": repo.url(), "script": "hello.py"}))
        .await?;
    c.wait_status(&done, &["succeeded"], LONG).await?;
    let pending = c
        .submit(json!({"repo": repo.url(), "script": "hello.py", "compute": "gpu"}))
        .await?;

    let mut probe = Probe {
        c: &c,
        doc: &doc,
        checked: 0,
    };
    let big = serde_json::to_vec(&json!({
        "repo": repo.url(), "script": "hello.py", "args": ["x".repeat(runyard_controller::http::MAX_BODY)]
    }))?;
    let good_spec = serde_json::to_vec(&json!({"repo": repo.url(), "script": "hello.py"}))?;
    // DELETE last: the jobs must exist for everything else.
    let (deletes, others): (Vec<&Operation>, Vec<&Operation>) =
        ops.iter().partition(|op| op.method == Method::DELETE);
    for op in others.into_iter().chain(deletes) {
        let body = (op.method == Method::POST).then(|| good_spec.clone());
        for id in [done.as_str(), pending.as_str(), "nope", "%FF"] {
            let path = op.path.replace("{id}", id);
            let m = op.method.clone();
            probe
                .send(op, m.clone(), &path, &[], true, body.clone())
                .await?;
            // No token; a wrong method.
            probe
                .send(op, m.clone(), &path, &[], false, body.clone())
                .await?;
            probe
                .send(op, Method::PATCH, &path, &[], true, None)
                .await?;
            probe.send(op, Method::PUT, &path, &[], false, None).await?;
            // Bad and good query values, one parameter at a time.
            for name in &op.query {
                for value in [
                    "bogus",
                    "",
                    "-1",
                    "0",
                    "1",
                    "true",
                    "val_loss",
                    done.as_str(),
                ] {
                    probe
                        .send(op, m.clone(), &path, &[(name.as_str(), value)], true, None)
                        .await?;
                }
            }
            probe
                .send(
                    op,
                    m.clone(),
                    &path,
                    &[("limit", "1"), ("limit", "2")],
                    true,
                    None,
                )
                .await?;
            if op.takes_body {
                // Oversized and malformed bodies (only where a body is read: elsewhere the
                // server answers before the upload ends, and the client sees a broken pipe).
                probe
                    .send(op, m.clone(), &path, &[], true, Some(big.clone()))
                    .await?;
                probe
                    .send(op, m.clone(), &path, &[], true, Some(b"{".to_vec()))
                    .await?;
            }
            if !op.path.contains("{id}") {
                break;
            }
        }
    }
    // A second delete of the finished job: gone.
    let (status, body) = c.delete(&format!("/api/v1/jobs/{done}")).await?;
    assert_eq!(status, 404, "{body}");
    assert!(probe.checked > 200, "{} replies checked", probe.checked);
    c.shutdown().await
}

/// The checks above can fail: a status missing from the document, a field of the wrong type,
/// an undocumented content type, a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_catch_replies_that_differ_from_the_document() -> anyhow::Result<()> {
    let doc = serde_json::to_value(runyard_controller::http::openapi())?;
    let ops = operations(&doc)?;
    let show = ops
        .iter()
        .find(|o| o.method == Method::GET && o.path == "/api/v1/jobs/{id}")
        .context("show")?;
    let job = serde_json::to_vec(&runyard_api_job())?;
    check(&doc, show, 200, Some("application/json"), Some(&job))?;
    let mut wrong: Value = serde_json::from_slice(&job)?;
    wrong["attempt"] = json!("one");
    let wrong = serde_json::to_vec(&wrong)?;
    assert!(check(&doc, show, 200, Some("application/json"), Some(&wrong)).is_err());
    let mut missing: Value = serde_json::from_slice(&job)?;
    missing.as_object_mut().unwrap().remove("status");
    let missing = serde_json::to_vec(&missing)?;
    assert!(check(&doc, show, 200, Some("application/json"), Some(&missing)).is_err());
    assert!(check(&doc, show, 409, Some("application/json"), Some(&job)).is_err());
    assert!(check(&doc, show, 500, Some("application/json"), Some(&job)).is_err());
    assert!(check(&doc, show, 200, Some("text/plain"), Some(b"hi")).is_err());
    let error = br#"{"error": "no job with id `x`", "field": null}"#;
    check(&doc, show, 404, Some("application/json"), Some(error))?;
    assert!(
        check(
            &doc,
            show,
            404,
            Some("application/json"),
            Some(br#"{"error": 1}"#)
        )
        .is_err()
    );
    Ok(())
}

/// A job as the API shows it, with every optional part filled.
fn runyard_api_job() -> Value {
    let spec = runyard_model::JobSpec::from_value(json!({
        "repo": "https://h/a/b.git", "script": "t.py", "timeout": "1h", "requirements_file": "r.txt"
    }))
    .unwrap();
    let mut job = serde_json::to_value(runyard_model::Job::new(
        "01j".into(),
        spec,
        runyard_model::Timestamp::now(),
    ))
    .unwrap();
    for internal in ["schema_version", "report_offset"] {
        job.as_object_mut().unwrap().remove(internal);
    }
    job["progress"] =
        json!({"epoch": 1, "max_epochs": 3, "step": 10, "max_steps": null, "fraction": 0.3});
    job["best"] = json!({"monitor": "val_loss", "mode": "min", "score": 0.5, "path": "/c/best.ckpt",
        "size": 10, "sha256": "ab", "epoch": 1, "step": 9});
    job["environment"] = json!({"installer": "uv", "packages": ["torch==2"], "seconds": 1.5});
    job["metrics"] = json!({"val_loss": 0.5});
    job["failure"] = json!("exit");
    job["owner"] = json!("alice");
    job["finished_at"] = json!("2026-01-01T00:00:00.000Z");
    job
}
