#![forbid(unsafe_code)]
pub mod batch;
pub mod events;
pub mod session;
pub mod app;
pub mod config;
pub mod delivery;
mod error;
pub mod http;
pub mod metrics;
pub mod redis;

pub use error::{Error, Result};
