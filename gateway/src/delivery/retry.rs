//! Retry policy, kept apart from the I/O: how many quick attempts a batch gets before it is
//! spilled, and the backoff between attempts (exponential, capped, plus up to as much again of
//! random jitter: `backon`'s jitter).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// What the backend's answer means for the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: done.
    Delivered { code: u16 },
    /// 413: the batch is too large; split it.
    TooLarge,
    /// A 4xx that will not get better by retrying (400, 404, 422, ...): dead letter.
    Permanent { code: u16, body: String },
    /// 5xx, 3xx, 401, 403, 408, 425, 429, timeouts, connection errors, garbage: retry later.
    /// 401/403 and 3xx are configuration problems (secret, clock, URL) that an operator fixes;
    /// dead-lettering would turn a typo into lost data, so they wait in the spill instead.
    Transient { code: Option<u16>, error: String },
}

impl Outcome {
    pub fn from_status(code: u16, body: String) -> Self {
        match code {
            200..=299 => Outcome::Delivered { code },
            413 => Outcome::TooLarge,
            401 | 403 | 408 | 425 | 429 => Outcome::Transient {
                code: Some(code),
                error: body,
            },
            400..=499 => Outcome::Permanent { code, body },
            _ => Outcome::Transient {
                code: Some(code),
                error: body,
            },
        }
    }

    /// The `code` label of `whatsapp_gateway_backend_requests_total`: the status code, or `error`.
    pub fn code_label(&self) -> String {
        match self {
            Outcome::Delivered { code } | Outcome::Permanent { code, .. } => code.to_string(),
            Outcome::TooLarge => "413".into(),
            Outcome::Transient {
                code: Some(code), ..
            } => code.to_string(),
            Outcome::Transient { code: None, .. } => "error".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts on the hot path before a batch is spilled to the retry stream.
    pub hot_attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub factor: f32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            hot_attempts: 3,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            factor: 2.0,
        }
    }
}

impl RetryPolicy {
    /// Delays between attempts: exponential with jitter, capped, never ending (the spill drainer
    /// retries until the backend answers; the hot path takes only `hot_attempts - 1` of them).
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_classified() {
        assert!(matches!(
            Outcome::from_status(200, String::new()),
            Outcome::Delivered { code: 200 }
        ));
        assert!(matches!(
            Outcome::from_status(204, String::new()),
            Outcome::Delivered { .. }
        ));
        assert_eq!(Outcome::from_status(413, String::new()), Outcome::TooLarge);
        assert!(matches!(
            Outcome::from_status(422, String::new()),
            Outcome::Permanent { code: 422, .. }
        ));
        assert!(matches!(
            Outcome::from_status(404, String::new()),
            Outcome::Permanent { .. }
        ));
        for code in [301, 401, 403, 408, 425, 429, 500, 502, 503] {
            assert!(
                matches!(
                    Outcome::from_status(code, String::new()),
                    Outcome::Transient { .. }
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_never_ends() {
        let policy = RetryPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            ..Default::default()
        };
        let delays: Vec<Duration> = policy.backoff().take(50).collect();
        assert_eq!(delays.len(), 50);
        // Jitter adds at most one more delay's worth on top of the exponential step.
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(
            delays[10..].iter().any(|d| *d >= Duration::from_secs(1)),
            "grows: {delays:?}"
        );
    }
}
