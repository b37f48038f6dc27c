//! HTTP client for the controller's `/api/v1` API, used by the client commands.
//!
//! Invariants: every request carries the bearer token when one is known; every failure becomes a
//! `ClientError` whose message is one line a user can act on (an API error shows the API's own
//! message, which names the field at fault); replies keep the raw body so `--json` prints exactly
//! what the API sent. Requests and replies are `runyard_api`'s types, the ones the controller
//! serves.

use std::path::Path;
use std::time::Duration;

use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use runyard_api::{
    AgentList, AgentView, CreateToken, ErrorBody, JobView, ListJobsQuery, LogsQuery, PlacementList,
    SecretList, SecretView, SetSecret, TokenCreated, TokenList, TokenView, WhoAmI,
};
use runyard_model::{JobSpec, JobStatus};
use serde::de::DeserializeOwned;

use runyard_controller::tokens::ADMIN_TOKEN_FILE;

/// Connect timeout for every request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request timeout for requests that are not streams.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed exchange with the controller.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "`{url}` is not a controller URL ({reason}): give an http:// or https:// base URL with --controller or RUNYARD_CONTROLLER"
    )]
    InvalidUrl { url: String, reason: String },
    #[error(
        "cannot connect to the controller at {url} ({cause}): start it with `runyard up` or `runyard controller`, or set RUNYARD_CONTROLLER (or --controller) to its URL"
    )]
    Connect { url: String, cause: String },
    #[error(
        "cannot verify the TLS certificate of the controller at {url} ({cause}): give its CA with --ca FILE or RUNYARD_CA (the controller keeps it in <data-dir>/tls/ca.crt)"
    )]
    Untrusted { url: String, cause: String },
    #[error("the CA file is not usable: {cause}")]
    InvalidCa { cause: String },
    #[error("request to {url} failed: {cause}")]
    Request { url: String, cause: String },
    #[error(
        "{message}: pass the admin token with --token or RUNYARD_TOKEN (`runyard up` prints it; it is in <data-dir>/{ADMIN_TOKEN_FILE})"
    )]
    Unauthorized { message: String },
    /// The API refused the request; `message` is the API's, naming the field at fault.
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        field: Option<String>,
    },
    #[error("unexpected reply from {url}: {cause}")]
    Decode { url: String, cause: String },
    #[error("reading the reply from {url} failed: {cause}")]
    Body { url: String, cause: String },
}

/// A decoded reply and the body it came from.
#[derive(Debug)]
pub struct Reply<T> {
    pub value: T,
    pub raw: Vec<u8>,
}

pub use runyard_api::JobPage;

/// A client of one controller.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl ApiClient {
    /// Checks the base URL and `ca` (PEM certificates trusted for an https:// controller,
    /// besides the system's roots); does no I/O.
    pub fn with_ca(
        base: &str,
        token: Option<String>,
        ca: Option<&[u8]>,
    ) -> Result<ApiClient, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base.to_string(),
            reason: reason.to_string(),
        };
        let url = Url::parse(base).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if url.cannot_be_a_base() || url.host().is_none() {
            return Err(invalid("no host"));
        }
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(pem) = ca {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ClientError::InvalidCa {
                    cause: one_line(&cause_of(&e)),
                })?;
            if certs.is_empty() {
                return Err(ClientError::InvalidCa {
                    cause: "no PEM certificate in it".into(),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| ClientError::Request {
            url: base.to_string(),
            cause: one_line(&cause_of(&e)),
        })?;
        Ok(ApiClient {
            http,
            base: url,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// `base` + path segments, each segment escaped (a job id cannot change the route).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A request to `url` carrying the token.
    fn request(&self, method: Method, url: &Url) -> RequestBuilder {
        let req = self.http.request(method, url.clone());
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends one request and turns transport failures and non-2xx replies into errors.
    async fn send(
        &self,
        mut req: RequestBuilder,
        url: &Url,
        stream: bool,
    ) -> Result<reqwest::Response, ClientError> {
        if !stream {
            req = req.timeout(REQUEST_TIMEOUT);
        }
        let resp = req.send().await.map_err(|e| self.transport(url, &e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let raw = resp.bytes().await.unwrap_or_default();
        Err(self.api_error(url, status, &raw))
    }

    fn transport(&self, url: &Url, e: &reqwest::Error) -> ClientError {
        let cause = one_line(&cause_of(e));
        if self.base.scheme() == "https" && cause.to_ascii_lowercase().contains("certificate") {
            return ClientError::Untrusted {
                url: self.base.to_string(),
                cause,
            };
        }
        if e.is_connect() {
            ClientError::Connect {
                url: self.base.to_string(),
                cause,
            }
        } else {
            ClientError::Request {
                url: url.to_string(),
                cause,
            }
        }
    }

    fn api_error(&self, url: &Url, status: StatusCode, raw: &[u8]) -> ClientError {
        let (message, field) = match serde_json::from_slice::<ErrorBody>(raw) {
            Ok(b) => (one_line(&b.error), b.field),
            Err(_) => {
                let text = String::from_utf8_lossy(raw);
                let text: String = one_line(text.trim()).chars().take(200).collect();
                let message = if text.is_empty() {
                    format!("HTTP {status} from {url}")
                } else {
                    format!("HTTP {status} from {url}: {text}")
                };
                (message, None)
            }
        };
        if status == StatusCode::UNAUTHORIZED {
            let message = if self.token.is_none() {
                format!("{message} (no token given)")
            } else {
                message
            };
            return ClientError::Unauthorized { message };
        }
        ClientError::Api {
            status: status.as_u16(),
            message,
            field,
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        url: Url,
    ) -> Result<Reply<T>, ClientError> {
        let resp = self.send(req, &url, false).await?;
        let raw = resp.bytes().await.map_err(|e| ClientError::Body {
            url: url.to_string(),
            cause: one_line(&cause_of(&e)),
        })?;
        let value = serde_json::from_slice(&raw).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            cause: one_line(&e.to_string()),
        })?;
        Ok(Reply {
            value,
            raw: raw.to_vec(),
        })
    }

    /// `POST /api/v1/jobs`.
    pub async fn submit(&self, spec: &JobSpec) -> Result<Reply<JobView>, ClientError> {
        let url = self.url(&["api", "v1", "jobs"]);
        self.json(self.request(Method::POST, &url).json(spec), url)
            .await
    }

    /// `POST /api/v1/snapshots`: a local directory's archive.
    pub async fn upload_snapshot(
        &self,
        archive: Vec<u8>,
    ) -> Result<Reply<runyard_api::SnapshotView>, ClientError> {
        let url = self.url(&["api", "v1", "snapshots"]);
        self.json(
            self.request(Method::POST, &url)
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .body(archive),
            url,
        )
        .await
    }

    /// `GET /api/v1/jobs`, one page.
    pub async fn list_jobs(
        &self,
        status: Option<JobStatus>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<Reply<JobPage>, ClientError> {
        let query = ListJobsQuery::new(status, limit, cursor);
        let url = self.url(&["api", "v1", "jobs"]);
        self.json(self.request(Method::GET, &url).query(&query), url)
            .await
    }

    /// `POST /api/v1/services`: the flat service spec.
    pub async fn serve(
        &self,
        spec: &serde_json::Value,
    ) -> Result<Reply<runyard_api::ServiceView>, ClientError> {
        let url = self.url(&["api", "v1", "services"]);
        self.json(self.request(Method::POST, &url).json(spec), url)
            .await
    }

    /// `GET /api/v1/services`.
    pub async fn services(&self) -> Result<Reply<runyard_api::ServiceList>, ClientError> {
        let url = self.url(&["api", "v1", "services"]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `GET /api/v1/services/{name}`.
    pub async fn service(
        &self,
        name: &str,
    ) -> Result<Reply<runyard_api::ServiceView>, ClientError> {
        let url = self.url(&["api", "v1", "services", name]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `POST /api/v1/services/{name}/scale`.
    pub async fn scale_service(
        &self,
        name: &str,
        req: &runyard_api::ScaleRequest,
    ) -> Result<Reply<runyard_api::ServiceView>, ClientError> {
        let url = self.url(&["api", "v1", "services", name, "scale"]);
        self.json(self.request(Method::POST, &url).json(req), url)
            .await
    }

    /// `POST /api/v1/services/{name}/stop`.
    pub async fn stop_service(
        &self,
        name: &str,
    ) -> Result<Reply<runyard_api::ServiceView>, ClientError> {
        let url = self.url(&["api", "v1", "services", name, "stop"]);
        self.json(self.request(Method::POST, &url), url).await
    }

    /// `DELETE /api/v1/services/{name}`.
    pub async fn remove_service(&self, name: &str) -> Result<(), ClientError> {
        let url = self.url(&["api", "v1", "services", name]);
        self.send(self.request(Method::DELETE, &url), &url, false)
            .await
            .map(|_| ())
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<Reply<JobView>, ClientError> {
        let url = self.url(&["api", "v1", "jobs", id]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `GET /api/v1/jobs/{id}/placements`: the job's attempts, oldest first.
    pub async fn placements(&self, id: &str) -> Result<Reply<PlacementList>, ClientError> {
        let url = self.url(&["api", "v1", "jobs", id, "placements"]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `POST /api/v1/jobs/{id}/stop`.
    pub async fn stop(&self, id: &str) -> Result<Reply<JobView>, ClientError> {
        let url = self.url(&["api", "v1", "jobs", id, "stop"]);
        self.json(self.request(Method::POST, &url), url).await
    }

    /// `DELETE /api/v1/jobs/{id}`: the job as it was when deleted.
    pub async fn delete(&self, id: &str) -> Result<Reply<JobView>, ClientError> {
        let url = self.url(&["api", "v1", "jobs", id]);
        self.json(self.request(Method::DELETE, &url), url).await
    }

    /// `GET /api/v1/whoami`.
    pub async fn whoami(&self) -> Result<Reply<WhoAmI>, ClientError> {
        let url = self.url(&["api", "v1", "whoami"]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `POST /api/v1/tokens`: the new token, shown once.
    pub async fn create_token(
        &self,
        name: &str,
        role: runyard_model::Role,
    ) -> Result<Reply<TokenCreated>, ClientError> {
        let url = self.url(&["api", "v1", "tokens"]);
        let body = CreateToken {
            name: name.to_string(),
            role,
        };
        self.json(self.request(Method::POST, &url).json(&body), url)
            .await
    }

    /// `GET /api/v1/tokens`.
    pub async fn tokens(&self) -> Result<Reply<TokenList>, ClientError> {
        let url = self.url(&["api", "v1", "tokens"]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `DELETE /api/v1/tokens/{name}`.
    pub async fn revoke_token(&self, name: &str) -> Result<Reply<TokenView>, ClientError> {
        let url = self.url(&["api", "v1", "tokens", name]);
        self.json(self.request(Method::DELETE, &url), url).await
    }

    /// `PUT /api/v1/secrets/{name}`.
    pub async fn set_secret(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Reply<SecretView>, ClientError> {
        let url = self.url(&["api", "v1", "secrets", name]);
        let body = SetSecret {
            value: value.to_string(),
        };
        self.json(self.request(Method::PUT, &url).json(&body), url)
            .await
    }

    /// `GET /api/v1/secrets`.
    pub async fn secrets(&self) -> Result<Reply<SecretList>, ClientError> {
        let url = self.url(&["api", "v1", "secrets"]);
        self.json(self.request(Method::GET, &url), url).await
    }

    /// `DELETE /api/v1/secrets/{name}`.
    pub async fn remove_secret(&self, name: &str) -> Result<Reply<serde_json::Value>, ClientError> {
        let url = self.url(&["api", "v1", "secrets", name]);
        self.json(self.request(Method::DELETE, &url), url).await
    }

    /// `GET /api/v1/agents`.
    pub async fn agents(&self) -> Result<Reply<Vec<AgentView>>, ClientError> {
        let url = self.url(&["api", "v1", "agents"]);
        let reply: Reply<AgentList> = self.json(self.request(Method::GET, &url), url).await?;
        Ok(Reply {
            value: reply.value.agents,
            raw: reply.raw,
        })
    }

    /// `GET /api/v1/jobs/{id}/checkpoint`: the headers now, the bytes through `Checkpoint::chunk`.
    pub async fn checkpoint(&self, id: &str) -> Result<Checkpoint, ClientError> {
        let url = self.url(&["api", "v1", "jobs", id, "checkpoint"]);
        let response = self
            .send(self.request(Method::GET, &url), &url, true)
            .await?;
        let headers = response.headers();
        let header = |name: reqwest::header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let file_name =
            header(reqwest::header::CONTENT_DISPOSITION).and_then(|v| attachment_name(&v));
        let sha256 = header(reqwest::header::HeaderName::from_static(
            "x-checksum-sha256",
        ))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty());
        let size = header(reqwest::header::CONTENT_LENGTH).and_then(|s| s.trim().parse().ok());
        Ok(Checkpoint {
            file_name,
            sha256,
            size,
            url: url.to_string(),
            response,
        })
    }

    /// `GET /api/v1/jobs/{id}/logs`: the body's chunks as they arrive. With `follow` the body
    /// lasts until the job is terminal (or the connection breaks).
    /// The job's log. `from`: an attempt and a byte offset into its log; the stream then ends
    /// when that attempt is over.
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        from: Option<(u32, u64)>,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ClientError>> + use<>, ClientError> {
        let url = self.url(&["api", "v1", "jobs", id, "logs"]);
        let query = LogsQuery::new(follow, from);
        let resp = self
            .send(self.request(Method::GET, &url).query(&query), &url, true)
            .await?;
        let url = url.to_string();
        Ok(resp.bytes_stream().map(move |chunk| {
            chunk.map(|b| b.to_vec()).map_err(|e| ClientError::Body {
                url: url.clone(),
                cause: one_line(&cause_of(&e)),
            })
        }))
    }
}

/// The reply of `GET /api/v1/jobs/{id}/checkpoint` before its body is read.
pub struct Checkpoint {
    /// The file name from `content-disposition`, if it gave a usable one (no directories).
    pub file_name: Option<String>,
    /// `x-checksum-sha256`, lowercase hex.
    pub sha256: Option<String>,
    /// `content-length`.
    pub size: Option<u64>,
    /// Where the bytes come from, for error messages.
    pub url: String,
    response: reqwest::Response,
}

impl Checkpoint {
    /// The next chunk of the file; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        self.response
            .chunk()
            .await
            .map(|c| c.map(|b| b.to_vec()))
            .map_err(|e| ClientError::Body {
                url: self.url.clone(),
                cause: one_line(&cause_of(&e)),
            })
    }
}

/// The token to use: the given one, else the admin token stored in `data_dir` if readable.
pub fn resolve_token(given: Option<String>, data_dir: Option<&Path>) -> Option<String> {
    if let Some(t) = given.filter(|t| !t.trim().is_empty()) {
        return Some(t.trim().to_string());
    }
    let path = data_dir?.join(ADMIN_TOKEN_FILE);
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// The `filename` of a `content-disposition` value, kept only if it is a plain file name: no
/// directory part, not `.` or `..`, no control characters (a reply cannot choose the directory).
fn attachment_name(disposition: &str) -> Option<String> {
    const KEY: &str = "filename=";
    // ASCII lowercasing keeps byte offsets, so they index the original too.
    let lower = disposition.to_ascii_lowercase();
    let (at, _) = lower
        .match_indices(KEY)
        .find(|(i, _)| lower[..*i].trim_end().ends_with(';'))?;
    let rest = disposition[at + KEY.len()..].trim_start();
    let name = match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"')?],
        None => rest.split(';').next().unwrap_or_default().trim(),
    };
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control);
    plain.then(|| name.to_string())
}

/// The innermost cause of an error chain: for a refused connection this is the OS's words.
fn cause_of(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// Collapses line breaks so an error stays one line.
pub fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_ids_and_keep_a_prefix() {
        let c = ApiClient::with_ca("http://h:1/prefix/", None, None).unwrap();
        assert_eq!(
            c.url(&["api", "v1", "jobs", "a/b?c"]).as_str(),
            "http://h:1/prefix/api/v1/jobs/a%2Fb%3Fc"
        );
        let c = ApiClient::with_ca("http://h:1", None, None).unwrap();
        assert_eq!(
            c.url(&["api", "v1", "agents"]).as_str(),
            "http://h:1/api/v1/agents"
        );
    }

    #[test]
    fn rejects_non_http_urls() {
        for bad in ["127.0.0.1:7900", "ftp://h/", "nonsense", "mailto:x@y"] {
            let e = ApiClient::with_ca(bad, None, None).unwrap_err();
            assert!(matches!(e, ClientError::InvalidUrl { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn api_errors_show_the_api_message() {
        let c = ApiClient::with_ca("http://h:1", Some("t".into()), None).unwrap();
        let url = c.url(&["api", "v1", "jobs"]);
        let e = c.api_error(
            &url,
            StatusCode::BAD_REQUEST,
            br#"{"error":"repo: must not be empty","field":"repo"}"#,
        );
        assert_eq!(e.to_string(), "repo: must not be empty");
        assert!(
            matches!(e, ClientError::Api { status: 400, field: Some(ref f), .. } if f == "repo")
        );
        let e = c.api_error(&url, StatusCode::BAD_GATEWAY, b"upstream\ndown");
        assert_eq!(
            e.to_string(),
            "HTTP 502 Bad Gateway from http://h:1/api/v1/jobs: upstream down"
        );
        let e = c.api_error(&url, StatusCode::UNAUTHORIZED, br#"{"error":"bad token"}"#);
        assert!(e.to_string().starts_with("bad token: pass the admin token"));
    }

    #[test]
    fn attachment_names_are_plain_file_names() {
        let name = |v: &str| attachment_name(v);
        assert_eq!(
            name(r#"attachment; filename="best.ckpt""#).as_deref(),
            Some("best.ckpt")
        );
        assert_eq!(
            name("attachment; FileName=epoch=2-step=40.ckpt").as_deref(),
            Some("epoch=2-step=40.ckpt")
        );
        assert_eq!(
            name(r#"attachment; filename="a; b.ckpt"; size=3"#).as_deref(),
            Some("a; b.ckpt")
        );
        for bad in [
            "attachment",
            "attachment; xfilename=a",
            r#"attachment; filename="""#,
            r#"attachment; filename="../x""#,
            r#"attachment; filename="/etc/passwd""#,
            r#"attachment; filename="..""#,
            r#"attachment; filename="a\b""#,
            "attachment; filename=\"a\tb\"",
        ] {
            assert_eq!(name(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_falls_back_to_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_token(None, Some(dir.path())), None);
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "rya_x\n").unwrap();
        assert_eq!(
            resolve_token(None, Some(dir.path())).as_deref(),
            Some("rya_x")
        );
        assert_eq!(
            resolve_token(Some("given".into()), Some(dir.path())).as_deref(),
            Some("given")
        );
    }
}
