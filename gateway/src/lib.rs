#![forbid(unsafe_code)]
pub mod api;
pub mod app;
pub mod batch;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod delivery;
mod error;
pub mod events;
pub mod http;
pub mod informer;
pub mod manage;
pub mod metrics;
pub mod redis;
pub mod secrets;
pub mod session;
pub mod shard;
pub mod status;

pub use error::{Error, Result};

/// Makes aws-lc-rs rustls' process-wide crypto provider (idempotent). Both of rustls' providers
/// are compiled in (different dependencies ask for each), so rustls cannot pick one by itself and
/// the first TLS client built from its defaults (fred's, for `rediss://`) would panic; kube and
/// reqwest are built with aws-lc-rs too.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
