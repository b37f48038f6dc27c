//! Secrets reach the job's environment and nothing else: not the job's JSON, the list, the
//! event stream, the placements or the stored intent. Controller-side secrets are set by admins
//! and copied into a job at submit; a job's values go with it when it is deleted.

use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// Prints the sha256 of each secret it gets, never the value.
const SHOW: &str = r#"
import hashlib, os
for k in ("API_KEY", "DB_PASSWORD", "PLAIN"):
    v = os.environ.get(k)
    print(k, hashlib.sha256(v.encode()).hexdigest() if v is not None else "missing")
"#;

fn sha(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_job_and_no_view_of_it() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("show.py", SHOW)])?;
    let mut c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let (given, named) = ("s3cr3t-given-value-93a1", "s3cr3t-named-value-77b2");

    // An admin sets a controller-side secret; the list shows its name only.
    let r = c
        .client
        .put(format!("{}/api/v1/secrets/db", c.base_url()))
        .bearer_auth(&c.token)
        .json(&json!({"value": named}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let list = c.get("/api/v1/secrets").await?;
    assert_eq!(list["secrets"][0]["name"], "db", "{list}");
    assert!(!list.to_string().contains(named));

    // A job naming an unknown secret is refused, naming the variable.
    let (status, err) = c
        .post(
            "/api/v1/jobs",
            &json!({"repo": repo.url(), "script": "show.py", "secrets": {"X": {"secret": "nope"}}}),
        )
        .await?;
    assert_eq!(
        (status, err["field"].as_str()),
        (400, Some("secrets.X")),
        "{err}"
    );
    let (status, err) = c
        .post(
            "/api/v1/jobs",
            &json!({"repo": repo.url(), "script": "show.py", "secrets": {"X": {"given": true}}}),
        )
        .await?;
    assert_eq!(status, 400, "{err}");

    let id = c
        .submit(json!({
            "repo": repo.url(), "script": "show.py", "env": {"PLAIN": "visible"},
            "secrets": {"API_KEY": given, "DB_PASSWORD": {"secret": "db"}}
        }))
        .await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let log = c.logs(&id).await?;
    assert!(log.contains(&format!("API_KEY {}", sha(given))), "{log}");
    assert!(
        log.contains(&format!("DB_PASSWORD {}", sha(named))),
        "{log}"
    );
    assert!(log.contains(&format!("PLAIN {}", sha("visible"))), "{log}");

    // No view of the job shows a value; the names are there.
    assert_eq!(
        job["spec"]["secrets"]["API_KEY"],
        json!({"given": true}),
        "{job}"
    );
    assert_eq!(
        job["spec"]["secrets"]["DB_PASSWORD"],
        json!({"secret": "db"}),
        "{job}"
    );
    assert_eq!(job["spec"]["env"]["PLAIN"], "visible", "env stays visible");
    let views = [
        c.get(&format!("/api/v1/jobs/{id}")).await?.to_string(),
        c.get("/api/v1/jobs").await?.to_string(),
        c.get(&format!("/api/v1/jobs/{id}/placements"))
            .await?
            .to_string(),
    ];
    for v in &views {
        assert!(!v.contains(given) && !v.contains(named), "{v}");
    }
    // The stored intent holds names only; the values are kept apart.
    c.stop_controller().await?;
    {
        let store = runyard_controller::store::open(&c.config.store, &c.config.data_dir).await?;
        let intent = store.get(&format!("jobs/{id}")).await?.expect("intent");
        let text = String::from_utf8_lossy(&intent.value);
        assert!(!text.contains(given) && !text.contains(named), "{text}");
        let apart = store
            .get(&format!("job-secrets/{id}"))
            .await?
            .expect("values");
        assert!(String::from_utf8_lossy(&apart.value).contains(given));
    }
    c.start_controller().await?;

    // Only admins set and remove secrets; anyone may read the names.
    let (_, viewer) = c
        .post("/api/v1/tokens", &json!({"name": "vera", "role": "viewer"}))
        .await?;
    let vera = viewer["token"].as_str().unwrap_or_default();
    let r = c
        .client
        .put(format!("{}/api/v1/secrets/db", c.base_url()))
        .bearer_auth(vera)
        .json(&json!({"value": "x"}))
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    let r = c
        .client
        .get(format!("{}/api/v1/secrets", c.base_url()))
        .bearer_auth(vera)
        .send()
        .await?;
    assert_eq!(r.status(), 200);

    // Removing the named secret leaves the submitted job's copy; deleting the job removes it.
    let (status, _) = c.delete("/api/v1/secrets/db").await?;
    assert_eq!(status, 200);
    let (status, _) = c.delete("/api/v1/secrets/db").await?;
    assert_eq!(status, 404);
    let (status, _) = c.delete(&format!("/api/v1/jobs/{id}")).await?;
    assert_eq!(status, 200);
    c.stop_controller().await?;
    {
        let store = runyard_controller::store::open(&c.config.store, &c.config.data_dir).await?;
        assert!(
            store.get(&format!("job-secrets/{id}")).await?.is_none(),
            "gone with the job"
        );
    }
    c.start_controller().await?;
    c.shutdown().await
}
