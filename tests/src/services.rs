//! What service tests and benchmarks share: a small model server in Python (stdlib only) and
//! waiting for a service's replicas.

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use crate::cluster::TestCluster;

/// A replica: `GET /health`, `GET /anything` (who answered), `GET /slow?ms=N`, `POST` (echo;
/// a batch when `x-runyard-batch-size` is set), `GET /upgrade` (101, then echoes bytes).
/// `COST_MS` is a fixed cost per call (per batch when batching); with `SERIAL=1` calls pay it
/// one at a time (a server that does one call at a time, as a GPU model does); `VERSION` is
/// echoed; `$FAIL_HEALTH_FILE`, when it exists, makes `/health` answer 503.
pub const SERVER_PY: &str = r#"import json, os, signal, sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs

COST = float(os.environ.get("COST_MS", "0")) / 1000.0
VERSION = os.environ.get("VERSION", "1")
FAIL = os.environ.get("FAIL_HEALTH_FILE")
SERIAL = threading.Lock() if os.environ.get("SERIAL") == "1" else None

def cost():
    if SERIAL:
        with SERIAL:
            time.sleep(COST)
    else:
        time.sleep(COST)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are two writes: without it the body waits for the peer's delayed
    # ACK (40 ms per request).
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        u = urlparse(self.path)
        q = parse_qs(u.query)
        if u.path == "/health":
            if FAIL and os.path.exists(FAIL):
                return self.reply(503, {})
            return self.reply(200, {"ok": True})
        if u.path.startswith("/missing"):
            return self.reply(404, {})
        if u.path == "/upgrade":
            if "upgrade" not in self.headers.get("Connection", "").lower():
                return self.reply(400, {"error": "Connection must be Upgrade"})
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                b = self.rfile.read1(4096)
                if not b:
                    break
                self.wfile.write(b)
                self.wfile.flush()
            self.close_connection = True
            return
        if u.path == "/slow":
            time.sleep(float(q.get("ms", ["100"])[0]) / 1000)
        if COST:
            cost()
        self.reply(200, {"job": os.environ.get("RUNYARD_JOB_ID"), "pid": os.getpid(),
                         "path": self.path, "version": VERSION,
                         "prefix": self.headers.get("x-forwarded-prefix"),
                         "auth": self.headers.get("authorization"),
                         "cookie": self.headers.get("cookie"),
                         "checkpoint": os.environ.get("RUNYARD_CHECKPOINT")})
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = json.loads(self.rfile.read(n) or b"null")
        if COST:
            cost()
        if self.headers.get("x-runyard-batch-size"):
            return self.reply(200, [{"echo": x, "batch": len(data)} for x in data])
        self.reply(200, {"echo": data, "batch": 1})

srv = ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H)
srv.daemon_threads = True
print("serving on", os.environ["PORT"], "version", VERSION, flush=True)
def term(*a):
    print("SIGTERM: shutting down", flush=True)
    threading.Thread(target=srv.shutdown).start()
signal.signal(signal.SIGTERM, term)
srv.serve_forever()
print("stopped", flush=True)
"#;

/// A trivial replica on uvicorn + Starlette (`requirements: ["uvicorn", "starlette"]`): `GET /`
/// answers a short plain-text body, `GET /health` 200, `GET /pid` the server's pid.
pub const UVICORN_PY: &str = r#"import os
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def hello(request):
    return PlainTextResponse("hello")

async def health(request):
    return PlainTextResponse("ok")

async def pid(request):
    return PlainTextResponse(str(os.getpid()))

app = Starlette(routes=[Route("/", hello), Route("/health", health), Route("/pid", pid)])
uvicorn.run(app, host="0.0.0.0", port=int(os.environ["PORT"]), log_level="warning")
"#;

/// Polls the service until `ok(view)` holds.
pub async fn wait_service(
    c: &TestCluster,
    name: &str,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = Value::Null;
    loop {
        if let Ok(v) = c.get(&format!("/api/v1/services/{name}")).await {
            if ok(&v) {
                return Ok(v);
            }
            last = v;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for service {name} to be {what}; last seen: {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ready replicas (not draining) of a service view.
pub fn ready(v: &Value) -> Vec<&Value> {
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["ready"] == true && r["draining"] == false)
                .collect()
        })
        .unwrap_or_default()
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub failures: Vec<String>,
    /// `version` of each answer, in order of arrival (for rollouts).
    pub versions: Vec<String>,
}

/// `concurrency` clients GET `path` in a loop until `stop` is set (or `max_time` passes).
pub async fn load(
    c: &TestCluster,
    path: &str,
    concurrency: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max_time: Duration,
) -> LoadResult {
    use std::sync::atomic::Ordering;
    let deadline = tokio::time::Instant::now() + max_time;
    let url = format!("{}{path}", c.base_url());
    let results = futures::future::join_all((0..concurrency).map(|_| {
        let (url, stop, client, token) =
            (url.clone(), stop.clone(), c.client.clone(), c.token.clone());
        async move {
            let mut r = LoadResult::default();
            while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        r.ok += 1;
                        if let Ok(v) = resp.json::<Value>().await {
                            r.versions
                                .push(v["version"].as_str().unwrap_or("").to_string());
                        }
                    }
                    Ok(resp) => {
                        r.failed += 1;
                        let status = resp.status();
                        let body = resp.text().await.unwrap_or_default();
                        if r.failures.len() < 5 {
                            r.failures.push(format!("{status}: {body}"));
                        }
                    }
                    Err(e) => {
                        r.failed += 1;
                        if r.failures.len() < 5 {
                            r.failures.push(e.to_string());
                        }
                    }
                }
            }
            r
        }
    }))
    .await;
    let mut all = LoadResult::default();
    for r in results {
        all.ok += r.ok;
        all.failed += r.failed;
        all.failures.extend(r.failures);
        all.versions.extend(r.versions);
    }
    all
}
