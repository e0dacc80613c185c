//! The gateway crate's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchError),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("QR rendering: {0}")]
    QrRender(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cache: {0}")]
    Cache(String),
    #[error("session lookup: {0}")]
    Lookup(String),
    #[error("kubernetes: {0}")]
    Kube(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<kube::Error> for Error {
    fn from(err: kube::Error) -> Self {
        Error::Kube(err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }
}
