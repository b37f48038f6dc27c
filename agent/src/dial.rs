//! Dialing the controller: one endpoint configuration and the join-token header, shared by the
//! session stream and checkpoint uploads.

use std::time::Duration;

use runyard_proto::v1::agent_service_client::AgentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Largest message accepted from the controller.
const MAX_MESSAGE: usize = 16 << 20;

/// A client of the controller's agent service that sends the join token with every call.
pub type Client = AgentServiceClient<InterceptedService<Channel, JoinToken>>;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid controller URL `{url}`: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach the controller at {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the join token is not valid ASCII")]
    Token,
}

/// Adds `authorization: Bearer <join token>` to every request.
#[derive(Clone)]
pub struct JoinToken(MetadataValue<Ascii>);

impl Interceptor for JoinToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Connects to the controller's gRPC URL (`http://host:port`).
pub async fn connect(controller: &str, token: &str) -> Result<Client, DialError> {
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| DialError::Token)?;
    let channel = Endpoint::from_shared(controller.to_string())
        .map_err(|source| DialError::Url {
            url: controller.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|source| DialError::Connect {
            url: controller.into(),
            source,
        })?;
    Ok(
        AgentServiceClient::with_interceptor(channel, JoinToken(auth))
            .max_decoding_message_size(MAX_MESSAGE),
    )
}
