//! Dialing the controller: one endpoint configuration and the agent's identity headers (join
//! token, name, own credential), shared by the session stream and checkpoint uploads.
//!
//! Over TLS the connection is made here (TCP, then a rustls handshake with the agent's `Trust`)
//! and handed to tonic as its transport, so the identity headers are only ever written into a
//! verified TLS session: tonic never sees an `https://` URL it could dial some other way.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use runyard_proto::v1::agent_service_client::AgentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest message accepted from the controller.
const MAX_MESSAGE: usize = 16 << 20;

/// A client of the controller's agent service that sends the agent's identity with every call.
pub type Client = AgentServiceClient<InterceptedService<Channel, Identity>>;

/// Who the agent is to the controller: the join token (enrols a new name), the agent's name,
/// and its own credential (`credential.rs`), which alone opens sessions once enrolled.
#[derive(Clone, Debug)]
pub struct Auth {
    /// The join token's secret (without the CA fingerprint: `trust.rs` keeps that).
    pub token: String,
    pub name: String,
    pub credential: String,
    /// TLS to the controller as `trust::Trust` decided; `None` for a plain `http://` URL.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid controller URL `{url}`: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach the controller at {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("the join token, agent name or credential is not valid in a gRPC header")]
    Token,
}

/// Adds `authorization: Bearer <join token>`, the agent's name and its credential to every
/// request.
#[derive(Clone)]
pub struct Identity {
    token: MetadataValue<Ascii>,
    name: MetadataValue<Ascii>,
    credential: MetadataValue<Ascii>,
}

impl Identity {
    pub fn new(auth: &Auth) -> Result<Identity, DialError> {
        let value = |s: &str| {
            s.parse::<MetadataValue<Ascii>>()
                .map_err(|_| DialError::Token)
        };
        Ok(Identity {
            token: value(&format!("Bearer {}", auth.token))?,
            name: value(&auth.name)?,
            credential: value(&auth.credential)?,
        })
    }
}

impl Interceptor for Identity {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert("authorization", self.token.clone());
        md.insert(runyard_proto::AGENT_NAME_HEADER, self.name.clone());
        md.insert(runyard_proto::CREDENTIAL_HEADER, self.credential.clone());
        Ok(req)
    }
}

/// Connects to the controller's gRPC URL (`https://host:port`, or `http://` when plain).
pub async fn connect(controller: &str, auth: &Auth) -> Result<Client, DialError> {
    let identity = Identity::new(auth)?;
    let endpoint = Endpoint::from_shared(controller.to_string())
        .map_err(|source| DialError::Url {
            url: controller.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = match &auth.tls {
        None => endpoint.connect().await,
        Some(config) => {
            let config = config.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |uri: Uri| {
                    tls_connect(uri, config.clone())
                }))
                .await
        }
    }
    .map_err(|source| DialError::Connect {
        url: controller.into(),
        cause: causes(&source),
    })?;
    Ok(AgentServiceClient::with_interceptor(channel, identity)
        .max_decoding_message_size(MAX_MESSAGE))
}

/// TCP to the URL's host and port, then the TLS handshake (which verifies the controller).
async fn tls_connect(
    uri: Uri,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TokioIo<TlsStream<TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other("the controller URL has no host"))?;
    let name = crate::trust::server_name(host).map_err(std::io::Error::other)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, uri.port_u16().unwrap_or(443))).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| std::io::Error::other(crate::trust::explain_handshake_error(&e)))?;
    Ok(TokioIo::new(tls))
}

/// An error and its sources, one after another (tonic's own text alone says "transport error").
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}
