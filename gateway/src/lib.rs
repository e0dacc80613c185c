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
pub mod metrics;
pub mod redis;
pub mod session;
pub mod shard;
pub mod status;

pub use error::{Error, Result};
