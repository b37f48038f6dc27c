//! Git credentials by host against real servers: a plain-http one and an https one (a TLS
//! stand-in with a certificate made at test time) that record every request's Authorization
//! header. The credential reaches the https server of its host, never the plain-http one, never
//! another host.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509, X509NameBuilder};
use runyard_agent::checkout::{CheckoutCache, CheckoutError};
use runyard_agent::git_auth::{GitCredentials, HostCredential};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ghp_runyardGitAuthTestToken0123456789";

/// What the server saw: one entry per request, the Authorization header if any.
type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// Answers every request: 401 asking for Basic credentials without them, 404 with them.
fn answer(mut stream: impl Read + Write, seen: &Seen) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 64 << 10 {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let auth = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Authorization: ")
                .or_else(|| l.strip_prefix("authorization: "))
        })
        .map(|v| v.trim().to_string());
    let reply = if auth.is_some() {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    } else {
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    };
    seen.lock().unwrap().push(auth);
    let _ = stream.write_all(reply.as_bytes());
    let _ = stream.flush();
}

/// Serves plain http (no acceptor) or https on a loopback port; returns the port.
fn serve(tls: Option<SslAcceptor>, seen: Seen) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream): Result<TcpStream, _> = stream else {
                continue;
            };
            match &tls {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream) {
                        answer(tls, &seen);
                    }
                }
                None => answer(stream, &seen),
            }
        }
    });
    port
}

/// A self-signed certificate for `localhost`, trusted by libgit2 through its CA file option.
fn tls_for_localhost(dir: &Path) -> SslAcceptor {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "localhost").unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .build(&cert.x509v3_context(None, None))
        .unwrap();
    cert.append_extension(san).unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = cert.build();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.to_pem().unwrap()).unwrap();
    // SAFETY: a process-wide libgit2 option, set before any fetch of this test binary.
    unsafe { git2::opts::set_ssl_cert_file(ca.to_str().unwrap()).unwrap() };
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor.set_private_key(&key).unwrap();
    acceptor.set_certificate(&cert).unwrap();
    acceptor.build()
}

fn basic(user: &str, password: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

async fn fetch(dir: &Path, host_eq: &str, url: &str) -> Result<String, CheckoutError> {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let cred: HostCredential = format!("{host_eq}={}", token.display()).parse().unwrap();
    let cache =
        CheckoutCache::with_credentials(dir.join("mirrors"), GitCredentials::new(vec![cred]));
    let dest = tempfile::tempdir().unwrap();
    cache
        .checkout(url, "", &dest.path().join("src"), &CancellationToken::new())
        .await
}

#[tokio::test]
async fn a_credential_goes_to_its_https_host_and_never_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();

    // Plain http, the credential's own host: asked for credentials, it gets none.
    let seen_http: Seen = Arc::default();
    let port = serve(None, seen_http.clone());
    let err = fetch(
        dir.path(),
        "127.0.0.1",
        &format!("http://127.0.0.1:{port}/o/r.git"),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("--git-credential HOST=FILE"),
        "the error says what to do: {err}"
    );
    let seen = seen_http.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the server was asked");
    assert!(
        seen.iter().all(Option::is_none),
        "plain http saw a credential: {seen:?}"
    );

    // https, the credential's host: it gets the token as Basic auth of x-access-token.
    let tls = tls_for_localhost(dir.path());
    let seen_https: Seen = Arc::default();
    let port = serve(Some(tls), seen_https.clone());
    let url = format!("https://localhost:{port}/o/r.git");
    let _ = fetch(dir.path(), "localhost", &url).await;
    let seen = seen_https.lock().unwrap().clone();
    assert!(
        seen.contains(&Some(basic("x-access-token", TOKEN))),
        "the https server of the host got the token: {seen:?}"
    );

    // https, another host's credential: none.
    seen_https.lock().unwrap().clear();
    let _ = fetch(dir.path(), "git.example.com", &url).await;
    let seen = seen_https.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the server was asked");
    assert!(
        seen.iter().all(Option::is_none),
        "another host's credential was sent: {seen:?}"
    );

    // A port given with the host must match.
    seen_https.lock().unwrap().clear();
    let _ = fetch(
        dir.path(),
        &format!("localhost:{}", port.wrapping_add(1)),
        &url,
    )
    .await;
    assert!(seen_https.lock().unwrap().iter().all(Option::is_none));
}
