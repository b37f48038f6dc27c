//! Runyard's wire contract (`runyard.agent.v1`) and its conversions to and from domain nouns.
//!
//! - `v1`: code generated from `proto/runyard/agent/v1/agent.proto` by build.rs.
//! - `convert`: `From`/`TryFrom` between wire messages and `runyard_model` types.
//! - `secret`: the tokens and credentials both sides keep on disk (random, 0600).
//! - `datadir`: each side's data dir: created private, never re-moded, one process at a time.
//! - `join`: the agent join token (`RY1<CA fingerprint>::<secret>`) and CA fingerprints.

pub mod v1 {
    // Generated code: `Assign` carries a whole spec; boxing it would only make call sites noisier
    // for messages that are built once and sent.
    #![allow(clippy::large_enum_variant)]
    tonic::include_proto!("runyard.agent.v1");
}

mod convert;
pub mod datadir;
pub mod join;
pub mod secret;
pub mod snapshot;

/// gRPC metadata naming the agent that makes a call (sessions and uploads).
pub const AGENT_NAME_HEADER: &str = "x-runyard-agent";
/// gRPC metadata carrying the agent's own credential (see README "Agents: enrolment").
pub const CREDENTIAL_HEADER: &str = "x-runyard-credential";

pub use convert::{
    ConvertError, command_to_wire, spec_from_wire, spec_to_wire, status_from_wire, status_to_wire,
};
pub use join::{Fingerprint, JoinToken, JoinTokenError};
