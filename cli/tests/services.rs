//! Services end to end with the built binary: a controller, and an agent on another "host" (a
//! network namespace behind a veth pair) that reaches the controller only through a forwarder,
//! as an agent behind NAT does: the controller cannot dial it, so its replicas are reached
//! through the agent's own connection. Driven by the CLI (`serve`, `services`, `service ...`).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use runyard_tests::fixture::GitRepo;
use runyard_tests::services::SERVER_PY;
use serde_json::Value;

use common::{Sandbox, eventually, free_port};

const STARTUP: Duration = Duration::from_secs(60);

/// A network namespace joined to this one by a veth pair; removed (with the pair) on drop.
struct Netns {
    name: String,
    host_ip: Ipv4Addr,
}

impl Netns {
    /// `None` when namespaces cannot be made here (not root, no `ip`).
    fn create() -> Option<Netns> {
        let id = std::process::id() % 100_000;
        let name = format!("ry-svc-{id}");
        let (host_if, far_if) = (format!("ryh{id}"), format!("ryf{id}"));
        let net = (id % 250) as u8 + 1;
        let host_ip = Ipv4Addr::new(10, 213, net, 1);
        let far_ip = Ipv4Addr::new(10, 213, net, 2);
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns { name, host_ip };
        let n = ns.name.as_str();
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &far_if,
        ]) && ip(&["link", "set", &far_if, "netns", n])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "netns",
                "exec",
                n,
                "ip",
                "addr",
                "add",
                &format!("{far_ip}/30"),
                "dev",
                &far_if,
            ])
            && ip(&["netns", "exec", n, "ip", "link", "set", &far_if, "up"])
            && ip(&["netns", "exec", n, "ip", "link", "set", "lo", "up"]);
        assert!(ok, "cannot set up the veth pair of {n}");
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the other end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Forwards TCP connections from `listen` to `to` (the agent's way to the controller).
fn forwarder(listen: (Ipv4Addr, u16), to: u16) -> u16 {
    let l = TcpListener::bind(listen).expect("bind the forwarder");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(inbound) = conn else { continue };
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            for (mut from, mut into) in [
                (
                    inbound.try_clone().expect("clone"),
                    outbound.try_clone().expect("clone"),
                ),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

/// One plain HTTP/1.1 GET with the token; (status line, body).
fn get(http: u16, path: &str, token: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", http)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut all = String::new();
    s.read_to_string(&mut all).expect("read");
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn status(sb: &mut Sandbox, name: &str) -> Value {
    let out = sb.ok(&["service", "status", name, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn ready(v: &Value) -> usize {
    v["replicas"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["ready"] == true).count())
}

#[test]
fn a_service_on_an_agent_the_controller_cannot_dial_is_served_through_its_tunnel() {
    let Some(ns) = Netns::create() else {
        eprintln!("skipped: network namespaces need root and `ip`");
        return;
    };
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("server.py", SERVER_PY)]).expect("repo");
    let data = sb.path().join("controller");
    let (http, grpc) = (free_port(), free_port());
    let (data_arg, http_arg, grpc_arg) = (
        data.display().to_string(),
        format!("127.0.0.1:{http}"),
        format!("127.0.0.1:{grpc}"),
    );
    let _ctl = sb.spawn(
        "controller",
        &[
            "controller",
            "--no-tls",
            "--data-dir",
            &data_arg,
            "--http",
            &http_arg,
            "--grpc",
            &grpc_arg,
        ],
    );
    let token = eventually(STARTUP, "the admin token", || {
        std::fs::read_to_string(data.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });
    sb.set_client_env("RUNYARD_CONTROLLER", &format!("http://{http_arg}"));
    sb.set_client_env("RUNYARD_TOKEN", &token);
    eventually(STARTUP, "the controller to answer", || {
        (sb.run(&["agents"]).code == Some(0)).then_some(())
    });
    // The far agent reaches the controller through the forwarder on the host's side of the
    // pair; the controller sees the forwarder's address, not the agent's.
    let port = forwarder((ns.host_ip, 0), grpc);
    let token_file = data.join("agent.token").display().to_string();
    let far_dir = sb.path().join("far").display().to_string();
    let url = format!("http://{}:{port}", ns.host_ip);
    let _agent = sb.spawn_in_netns(
        "far",
        &ns.name,
        &[
            "agent",
            "--controller",
            &url,
            "--token-file",
            &token_file,
            "--name",
            "far",
            "--data-dir",
            &far_dir,
            "--compute",
            "cpu-small:2",
        ],
    );
    let repo_url = repo.url();
    let out = sb.ok(&[
        "serve",
        "--repo",
        &repo_url,
        "--script",
        "server.py",
        "--name",
        "echo",
        "--min",
        "1",
        "--max",
        "2",
    ]);
    assert!(out.contains("/s/echo/"), "{out}");
    let v = eventually(STARTUP, "a ready replica", || {
        let v = status(&mut sb, "echo");
        (ready(&v) == 1).then_some(v)
    });
    assert_eq!(v["replicas"][0]["agent"], "far");
    assert_eq!(
        v["replicas"][0]["path"], "tunnel",
        "the controller cannot dial the far host: {v}"
    );

    let (line, body) = get(http, "/s/echo/hello?x=1", &token);
    assert!(line.contains("200"), "{line}\n{body}");
    let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(answer["path"], "/hello?x=1");

    let list = sb.ok(&["services"]);
    assert!(list.contains("echo") && list.contains("ready"), "{list}");
    let text = sb.ok(&["service", "status", "echo"]);
    assert!(text.contains("tunnel") && text.contains("far"), "{text}");
    let logs = sb.ok(&["service", "logs", "echo"]);
    assert!(logs.contains("serving on"), "{logs}");

    sb.ok(&["service", "scale", "echo", "--min", "2"]);
    eventually(STARTUP, "two ready replicas", || {
        (ready(&status(&mut sb, "echo")) == 2).then_some(())
    });
    let refused = sb.run(&["service", "scale", "echo", "--min", "3"]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("replicas.min"),
        "{}",
        refused.stderr
    );

    sb.ok(&["service", "stop", "echo"]);
    eventually(STARTUP, "the service stopped", || {
        (status(&mut sb, "echo")["status"] == "stopped").then_some(())
    });
    sb.ok(&["service", "rm", "echo"]);
    let list: Value = serde_json::from_str(&sb.ok(&["services", "--json"])).expect("json");
    assert_eq!(list["services"], Value::Array(vec![]));
}
