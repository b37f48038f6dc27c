//! Bad input over the real HTTP API: a 4xx naming the field, and nothing changes.

use runyard_tests::cluster::TestCluster;
use serde_json::{Value, json};

async fn job_count(c: &TestCluster) -> anyhow::Result<usize> {
    Ok(c.get("/api/v1/jobs?limit=1000").await?["jobs"]
        .as_array()
        .unwrap()
        .len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_names_its_field_and_changes_nothing() -> anyhow::Result<()> {
    let c = TestCluster::builder().start().await?;
    let ok = json!({"repo": "https://example.invalid/a/b.git", "script": "train.py"});
    let with = |k: &str, v: Value| {
        let mut s = ok.clone();
        s[k] = v;
        s
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("colour", json!("red")), "colour"),
        (json!({"script": "train.py"}), "repo"),
        (json!({"repo": "https://h/x", "args": ["a"]}), "args"),
        (
            json!({"repo": "https://h/x", "script": "t.py", "parameters": {"a": 1}}),
            "parameters",
        ),
        (
            json!({"repo": "https://h/x", "mlflow": {"tracking_uri": "file:///m"}}),
            "mlflow.tracking_uri",
        ),
        (
            json!({"repo": "https://h/x", "mlflow": {"run_id": "abc"}}),
            "mlflow.tracking_uri",
        ),
        (with("repo", json!("not a url")), "repo"),
        (with("repo", json!("ftp://host/x.git")), "repo"),
        (with("script", json!("/abs/train.py")), "script"),
        (with("script", json!("../escape.py")), "script"),
        (with("compute", json!("tpu")), "compute"),
        (with("compute", json!("gpu:0")), "compute"),
        (with("timeout", json!(-5)), "timeout"),
        (with("timeout", json!("-1h")), "timeout"),
        (with("env", json!({"NOT-AN-ID": "x"})), "env.NOT-AN-ID"),
        (with("env", json!({"9LIVES": "x"})), "env.9LIVES"),
        (with("requirements", json!(["-e ."])), "requirements[0]"),
        (
            with(
                "requirements",
                json!(["numpy", "--index-url=https://evil.invalid"]),
            ),
            "requirements[1]",
        ),
        (
            with("requirements", json!(["-r other.txt"])),
            "requirements[0]",
        ),
        (with("retries", json!(-1)), "retries"),
        // Out of range: these reset the connection (a panic in the handler) before.
        (with("timeout", json!(1e30)), "timeout"),
        (with("stop_grace", json!(1e300)), "stop_grace"),
        (with("timeout", json!("400days")), "timeout"),
        // Too many, too long (each under the body limit).
        (with("args", json!(vec!["a"; 100_000])), "args"),
        (
            with("env", json!({"BIG": "v".repeat(900 * 1024)})),
            "env.BIG",
        ),
        (
            with(
                "env",
                Value::Object((0..30_000).map(|i| (format!("V{i}"), json!(""))).collect()),
            ),
            "env",
        ),
        (
            with(
                "repo",
                json!(format!("https://h/{}", "r".repeat(900 * 1024))),
            ),
            "repo",
        ),
    ];
    for (body, field) in cases {
        let (status, resp) = c.post("/api/v1/jobs", &body).await?;
        assert_eq!(status, 400, "{body} -> {resp}");
        assert_eq!(resp["field"], field, "{body} -> {resp}");
        assert!(resp["error"].as_str().unwrap().starts_with(field), "{resp}");
    }
    // Malformed JSON.
    let r = c
        .client
        .post(format!("{}/api/v1/jobs", c.base_url()))
        .bearer_auth(&c.token)
        .body("{")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().await?["field"], "body");
    // Over 1 MiB.
    let big = json!({"repo": "https://h/x/y", "script": "t.py", "args": ["x".repeat(1 << 20)]});
    let (status, resp) = c.post("/api/v1/jobs", &big).await?;
    assert_eq!(status, 413, "{resp}");
    assert_eq!(resp["field"], "body");
    assert_eq!(job_count(&c).await?, 0, "no bad input created a job");

    // Unknown ids, bad query parameters.
    let r = c
        .client
        .get(format!("{}/api/v1/jobs/nope", c.base_url()))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 404);
    let (status, _) = c.post("/api/v1/jobs/nope/stop", &json!({})).await?;
    assert_eq!(status, 404);
    let r = c
        .client
        .get(format!("{}/api/v1/jobs?status=bogus", c.base_url()))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().await?["field"], "status");
    let r = c
        .client
        .get(format!("{}/api/v1/jobs?limit=0", c.base_url()))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(r.json::<Value>().await?["field"], "limit");

    // Tokens: none, wrong; health needs none.
    let base = c.base_url();
    let r = c.client.get(format!("{base}/api/v1/jobs")).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .client
        .post(format!("{base}/api/v1/jobs"))
        .bearer_auth("wrong")
        .json(&ok)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .client
        .get(format!("{base}/api/v1/agents"))
        .bearer_auth(&c.agent_token)
        .send()
        .await?;
    assert_eq!(
        r.status().as_u16(),
        401,
        "the agent join token is not a user token"
    );
    assert_eq!(
        c.client
            .get(format!("{base}/healthz"))
            .send()
            .await?
            .text()
            .await?,
        "ok"
    );
    assert_eq!(job_count(&c).await?, 0);

    // A good one works.
    let (status, job) = c.post("/api/v1/jobs", &ok).await?;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["status"], "pending");
    assert_eq!(job["name"], "train");
    assert_eq!(job["spec"]["compute"], "cpu-small");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_wrong_token_is_refused() -> anyhow::Result<()> {
    use runyard_proto::v1;
    let c = TestCluster::builder().start().await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc_addr))?
        .connect()
        .await?;
    let mut client = v1::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer wrong".parse().unwrap());
            Ok(req)
        },
    );
    let reg = v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Register(v1::Register {
            name: "intruder".into(),
            ..Default::default()
        })),
    };
    let err = client
        .session(futures::stream::iter(vec![reg]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let agents = c.get("/api/v1/agents").await?;
    assert_eq!(agents["agents"].as_array().unwrap().len(), 0);
    c.shutdown().await
}
