#![forbid(unsafe_code)]
pub mod batch;
pub mod events;
pub mod session;
