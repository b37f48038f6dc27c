//! Dialing the controller: one endpoint configuration and the agent's identity headers (join
//! token, name, own credential), shared by the session stream and checkpoint uploads.

use std::time::Duration;

use runyard_proto::v1::agent_service_client::AgentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Largest message accepted from the controller.
const MAX_MESSAGE: usize = 16 << 20;

/// A client of the controller's agent service that sends the agent's identity with every call.
pub type Client = AgentServiceClient<InterceptedService<Channel, Identity>>;

/// Who the agent is to the controller: the join token (enrols a new name), the agent's name,
/// and its own credential (`credential.rs`), which alone opens sessions once enrolled.
#[derive(Clone, Debug)]
pub struct Auth {
    pub token: String,
    pub name: String,
    pub credential: String,
}

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

/// Connects to the controller's gRPC URL (`http://host:port`).
pub async fn connect(controller: &str, auth: &Auth) -> Result<Client, DialError> {
    let identity = Identity::new(auth)?;
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
    Ok(AgentServiceClient::with_interceptor(channel, identity)
        .max_decoding_message_size(MAX_MESSAGE))
}
