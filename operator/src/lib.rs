#![forbid(unsafe_code)]
//! The operator: assigns `WhatsappSession`s to gateway shards (bounded-load consistent hashing
//! over the gateways' Leases) and hands them over when shards come and go.

pub mod app;
pub mod assign;
pub mod conflict;
pub mod membership;
pub mod metrics;
pub mod placement;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("watch store: {0}")]
    Store(String),
    #[error("assignment: {0}")]
    Assign(String),
    #[error("leader election: {0}")]
    Lease(String),
    #[error("invalid config `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
