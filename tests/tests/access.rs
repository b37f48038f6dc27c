//! Users and roles over the real HTTP API: named tokens made by an admin, what each role may
//! do, job owners, immediate revocation, and agent secrets refused on the user API.

use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

/// One request with `token`; the status and the JSON body.
async fn call(
    c: &TestCluster,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut req = c
        .client
        .request(method, format!("{}{path}", c.base_url()))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_what_it_says_and_a_revoked_token_is_refused_at_once() -> anyhow::Result<()> {
    use reqwest::Method;
    let repo = GitRepo::new(&[
        ("hello.py", "print('hello')\n"),
        (
            "sleep.py",
            "import time\nprint('up', flush=True)\ntime.sleep(120)\n",
        ),
    ])?;
    let mut c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let admin = c.token.clone();

    // The admin makes tokens; each is shown once, and the list shows none.
    let mut tokens = std::collections::BTreeMap::new();
    for (name, role) in [("alice", "user"), ("bob", "user"), ("vera", "viewer")] {
        let (status, made) = c
            .post("/api/v1/tokens", &json!({"name": name, "role": role}))
            .await?;
        assert_eq!(status, 201, "{made}");
        assert_eq!(
            (made["name"].as_str(), made["role"].as_str()),
            (Some(name), Some(role))
        );
        assert_eq!(made["created_by"], "admin");
        tokens.insert(name, made["token"].as_str().expect("token").to_string());
    }
    let list = c.get("/api/v1/tokens").await?;
    assert_eq!(list["tokens"].as_array().map(Vec::len), Some(3), "{list}");
    for t in tokens.values() {
        assert!(
            !list.to_string().contains(t.as_str()),
            "a listed token: {list}"
        );
    }
    for (body, status) in [
        (json!({"name": "alice", "role": "user"}), 409),
        (json!({"name": "admin", "role": "user"}), 400),
        (json!({"name": "Not A Name", "role": "user"}), 400),
        (json!({"name": "carol", "role": "root"}), 400),
    ] {
        let (got, resp) = c.post("/api/v1/tokens", &body).await?;
        assert_eq!(got, status, "{body} -> {resp}");
    }
    let (alice, bob, vera) = (&tokens["alice"], &tokens["bob"], &tokens["vera"]);
    for (token, name, role) in [
        (alice, "alice", "user"),
        (vera, "vera", "viewer"),
        (&admin, "admin", "admin"),
    ] {
        let (status, me) = call(&c, token, Method::GET, "/api/v1/whoami", None).await?;
        assert_eq!(
            (status, me["name"].as_str(), me["role"].as_str()),
            (200, Some(name), Some(role))
        );
    }

    // A viewer reads, and may not submit.
    let spec = |script: &str| json!({"repo": repo.url(), "script": script});
    let (status, _) = call(&c, vera, Method::GET, "/api/v1/jobs", None).await?;
    assert_eq!(status, 200);
    let (status, err) = call(
        &c,
        vera,
        Method::POST,
        "/api/v1/jobs",
        Some(spec("hello.py")),
    )
    .await?;
    assert_eq!(status, 403, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("viewer `vera` may not submit"),
        "{err}"
    );

    // Users own what they submit; only the owner or an admin stops or deletes it.
    let (status, job) = call(
        &c,
        alice,
        Method::POST,
        "/api/v1/jobs",
        Some(spec("sleep.py")),
    )
    .await?;
    assert_eq!(
        (status, job["owner"].as_str()),
        (201, Some("alice")),
        "{job}"
    );
    let id = job["id"].as_str().unwrap().to_string();
    c.wait_status(&id, &["running"], LONG).await?;
    let stop = format!("/api/v1/jobs/{id}/stop");
    for token in [bob, vera] {
        let (status, err) = call(&c, token, Method::POST, &stop, None).await?;
        assert_eq!(status, 403, "{err}");
    }
    let (status, err) = call(&c, bob, Method::POST, &stop, None).await?;
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("only its owner or an admin"),
        "{err} {status}"
    );
    assert_eq!(
        c.job(&id).await?["status"],
        "running",
        "refused: nothing changed"
    );
    let (status, _) = call(&c, alice, Method::POST, &stop, None).await?;
    assert_eq!(status, 200);
    c.wait_status(&id, &["stopped"], LONG).await?;
    let job_path = format!("/api/v1/jobs/{id}");
    let (status, _) = call(&c, bob, Method::DELETE, &job_path, None).await?;
    assert_eq!(status, 403);
    let (status, _) = call(&c, &admin, Method::DELETE, &job_path, None).await?;
    assert_eq!(status, 200, "an admin deletes anyone's job");

    // Only admins manage agents and tokens.
    for (method, path) in [
        (Method::DELETE, "/api/v1/agents/a1"),
        (Method::GET, "/api/v1/tokens"),
        (Method::DELETE, "/api/v1/tokens/bob"),
    ] {
        let (status, err) = call(&c, alice, method, path, None).await?;
        assert_eq!(status, 403, "{path}: {err}");
        assert!(
            err["error"]
                .as_str()
                .unwrap()
                .contains("needs an admin token"),
            "{err}"
        );
    }

    // Agents' secrets are not user tokens.
    let agent_dir = c.agent_config(&AgentSpec::new("a1")).await?.data_dir;
    let credential = std::fs::read_to_string(agent_dir.join("agent.credential"))?;
    for secret in [c.agent_token.clone(), credential.trim().to_string()] {
        let (status, _) = call(&c, &secret, Method::GET, "/api/v1/jobs", None).await?;
        assert_eq!(status, 401);
    }

    // Revoked: refused from the next request on, and after a restart.
    let (status, gone) = c.delete("/api/v1/tokens/alice").await?;
    assert_eq!((status, gone["name"].as_str()), (200, Some("alice")));
    let (status, err) = call(&c, alice, Method::GET, "/api/v1/jobs", None).await?;
    assert_eq!(status, 401, "{err}");
    assert!(err["error"].as_str().unwrap().contains("revoked"), "{err}");
    c.restart_controller().await?;
    let (status, _) = call(&c, alice, Method::GET, "/api/v1/jobs", None).await?;
    assert_eq!(status, 401);
    let (status, me) = call(&c, bob, Method::GET, "/api/v1/whoami", None).await?;
    assert_eq!(
        (status, me["name"].as_str()),
        (200, Some("bob")),
        "kept across a restart"
    );
    c.shutdown().await
}
