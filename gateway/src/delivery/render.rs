//! Turning batches into the backend's wire format.

use std::io::Cursor;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Lane};
use crate::events::GatewayEvent;
use crate::{Error, Result};

/// How QR codes are sent to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QrFormat {
    /// A `data:image/png;base64,...` image, as the Node.js gateway sent.
    #[default]
    Png,
    /// The raw QR string, for backends that render it themselves.
    Raw,
}

/// Which backend endpoint a batch goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Qr,
    Status,
}

impl Endpoint {
    pub const ALL: [Endpoint; 2] = [Endpoint::Qr, Endpoint::Status];

    pub fn of(lane: Lane) -> Self {
        match lane {
            Lane::Qr => Endpoint::Qr,
            Lane::StatusHigh | Lane::StatusNormal => Endpoint::Status,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Qr => "qr",
            Endpoint::Status => "status",
        }
    }
}

/// A batch rendered for the wire, plus what the gateway needs to retry it later (it is what goes
/// into the spill stream, so it survives a restart).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireBatch {
    pub batch_id: String,
    pub endpoint: Endpoint,
    /// The batcher lane it came from (`Lane::as_str`), for metrics.
    pub lane: String,
    pub items: Vec<WireItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireItem {
    /// The JSON item exactly as the backend receives it.
    pub body: serde_json::Value,
    /// When the event happened (unix ms), for delivery latency across restarts.
    pub created_unix_ms: i64,
    /// When a QR code stops being useful (unix ms); expired items are not re-sent.
    pub expires_unix_ms: Option<i64>,
}

/// `{"batchId": ..., "items": [...]}`
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BatchBody<'a> {
    batch_id: &'a str,
    items: Vec<&'a serde_json::Value>,
}

pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl WireBatch {
    pub fn render(batch: &Batch, qr_format: QrFormat) -> Result<Self> {
        let now_ms = unix_ms_now();
        let mut items = Vec::with_capacity(batch.items.len());
        for event in &batch.items {
            let created_unix_ms = now_ms - event.created().elapsed().as_millis() as i64;
            let (body, expires_unix_ms) = match event {
                GatewayEvent::Qr(qr) => {
                    let mut body = serde_json::to_value(event)?;
                    if qr_format == QrFormat::Png && qr.kind.is_qr() {
                        match qr_png_data_url(&qr.code) {
                            Ok(url) => body["qr"] = serde_json::Value::String(url),
                            // Never lose the code: the backend can still render the raw string.
                            Err(err) => {
                                tracing::warn!(%err, session_id = %qr.session_id, "QR sent raw: PNG rendering failed")
                            }
                        }
                    }
                    (body, Some(qr.expires_at.timestamp_millis()))
                }
                GatewayEvent::Status(_) => (serde_json::to_value(event)?, None),
            };
            items.push(WireItem {
                body,
                created_unix_ms,
                expires_unix_ms,
            });
        }
        Ok(WireBatch {
            batch_id: uuid::Uuid::now_v7().to_string(),
            endpoint: Endpoint::of(batch.lane),
            lane: batch.lane.as_str().to_string(),
            items,
        })
    }

    /// The request body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&BatchBody {
            batch_id: &self.batch_id,
            items: self.items.iter().map(|i| &i.body).collect(),
        })
        .expect("batch body serializes")
    }

    /// Drops QR items that expired; returns how many.
    pub fn drop_expired(&mut self, now_unix_ms: i64) -> usize {
        let before = self.items.len();
        self.items
            .retain(|i| i.expires_unix_ms.is_none_or(|exp| exp > now_unix_ms));
        before - self.items.len()
    }

    /// Splits in two halves (for 413 answers), each with its own batch id derived from this one so
    /// retries of the halves stay idempotent.
    pub fn split(self) -> (WireBatch, WireBatch) {
        let mid = self.items.len() / 2;
        let mut first = self.items;
        let second = first.split_off(mid);
        (
            WireBatch {
                batch_id: format!("{}-a", self.batch_id),
                endpoint: self.endpoint,
                lane: self.lane.clone(),
                items: first,
            },
            WireBatch {
                batch_id: format!("{}-b", self.batch_id),
                endpoint: self.endpoint,
                lane: self.lane,
                items: second,
            },
        )
    }
}

/// Renders a QR string as a PNG data URL, as the Node.js gateway did.
pub fn qr_png_data_url(code: &str) -> Result<String> {
    let qr = qrcode::QrCode::new(code.as_bytes()).map_err(|e| Error::QrRender(e.to_string()))?;
    let image = qr
        .render::<image::Luma<u8>>()
        .min_dimensions(256, 256)
        .build();
    let mut png = Vec::with_capacity(4096);
    image::DynamicImage::ImageLuma8(image)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::QrRender(e.to_string()))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::FlushReason;
    use crate::events::{Priority, QrEvent, SessionStatus, StatusEvent};
    use std::time::Duration;

    #[tokio::test]
    async fn qr_batches_render_png_data_urls_or_raw_strings() {
        let batch = Batch {
            lane: Lane::Qr,
            items: vec![QrEvent::new("s1", "2@abc,def,ghi", 1, Duration::from_secs(60)).into()],
            reason: FlushReason::Deadline,
        };
        let png = WireBatch::render(&batch, QrFormat::Png).unwrap();
        let qr = png.items[0].body["qr"].as_str().unwrap();
        assert!(qr.starts_with("data:image/png;base64,iVBORw0KGgo"), "{qr}");
        let raw = WireBatch::render(&batch, QrFormat::Raw).unwrap();
        assert_eq!(raw.items[0].body["qr"], "2@abc,def,ghi");
        assert_eq!(raw.endpoint, Endpoint::Qr);
        let body: serde_json::Value = serde_json::from_slice(&raw.body()).unwrap();
        assert_eq!(body["batchId"], raw.batch_id);
        assert_eq!(body["items"][0]["sessionId"], "s1");
        assert!(
            body["items"][0].get("type").is_none(),
            "QR items keep the seed's shape"
        );
    }

    #[tokio::test]
    async fn pairing_codes_go_raw_with_their_type() {
        let batch = Batch {
            lane: Lane::Qr,
            items: vec![
                QrEvent::pairing_code("s1", "ABCD1234", 1, Duration::from_secs(180)).into(),
            ],
            reason: FlushReason::Deadline,
        };
        let png = WireBatch::render(&batch, QrFormat::Png).unwrap();
        assert_eq!(png.items[0].body["qr"], "ABCD1234");
        assert_eq!(png.items[0].body["type"], "pairing_code");
    }

    #[tokio::test]
    async fn expired_items_are_dropped_and_split_keeps_everything() {
        let batch = Batch {
            lane: Lane::StatusHigh,
            items: (0..5)
                .map(|i| {
                    StatusEvent::new(format!("s{i}"), SessionStatus::Active, Priority::High, None)
                        .into()
                })
                .collect(),
            reason: FlushReason::Immediate,
        };
        let mut wire = WireBatch::render(&batch, QrFormat::Raw).unwrap();
        assert_eq!(
            wire.drop_expired(unix_ms_now()),
            0,
            "status items never expire"
        );
        wire.items[0].expires_unix_ms = Some(1);
        assert_eq!(wire.drop_expired(unix_ms_now()), 1);
        let id = wire.batch_id.clone();
        let (a, b) = wire.split();
        assert_eq!(a.items.len() + b.items.len(), 4);
        assert_ne!(a.batch_id, b.batch_id);
        assert!(a.batch_id.starts_with(&id));
    }
}
