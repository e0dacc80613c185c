//! The backend contract as the backend sees it, through a real HTTP receiver: batch bodies,
//! idempotency keys, HMAC signatures, QR images, legacy single endpoints.

use std::time::Duration;

use base64::Engine;
use clap::Parser;
use gateway::app::Pipeline;
use gateway::config::{Cli, Mode as CliMode};
use gateway::events::{Priority, QrEvent, SessionStatus, StatusEvent};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use test_support::receiver::Receiver;
use test_support::wait_until;

fn settings(receiver: &Receiver, extra: &[&str]) -> gateway::config::Settings {
    let mut args = vec![
        "gateway".to_string(),
        "standalone".into(),
        "--backend-url".into(),
        receiver.url(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let CliMode::Standalone(a) = Cli::try_parse_from(args).unwrap().mode else {
        unreachable!("standalone args")
    };
    a.common.validate().unwrap()
}

async fn send_one_of_each(pipeline: &Pipeline) {
    let sink = pipeline.event_sink();
    sink.emit(StatusEvent::new(
        "acct-1",
        SessionStatus::QrPending,
        Priority::Normal,
        None,
    ))
    .await
    .unwrap();
    sink.emit(QrEvent::new(
        "acct-1",
        "2@ref,noise,identity,adv,1",
        1,
        Duration::from_secs(60),
    ))
    .await
    .unwrap();
    sink.emit(StatusEvent::new(
        "acct-2",
        SessionStatus::Inactive,
        Priority::High,
        Some("connection_lost".into()),
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn batches_are_signed_keyed_and_carry_png_qr_codes() {
    let receiver = Receiver::start().await.unwrap();
    let settings = settings(
        &receiver,
        &["--backend-secret", "s3cret", "--resync-interval-s", "0"],
    );
    let mut registry = gateway::metrics::new_registry();
    let pipeline = Pipeline::start(&settings, None, &mut registry, None)
        .await
        .unwrap();
    send_one_of_each(&pipeline).await;
    wait_until("3 items received", Duration::from_secs(10), || {
        let n: usize = receiver.received().iter().map(|r| r.items.len()).sum();
        async move {
            if n >= 3 {
                Ok(())
            } else {
                Err(format!("{n} items"))
            }
        }
    })
    .await
    .unwrap();
    pipeline.shutdown(Vec::new(), Duration::from_secs(5)).await;

    let received = receiver.received();
    for request in &received {
        assert!(
            request.path == "/qr/batch" || request.path == "/whatsapp/status/batch",
            "{}",
            request.path
        );
        assert!(!request.batch_id.is_empty());
        assert_eq!(request.headers["idempotency-key"], request.batch_id);
        let timestamp = &request.headers["x-signature-timestamp"];
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(&request.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            request.headers["x-signature-256"], expected,
            "signature over timestamp.body"
        );
    }
    let qr = receiver.items("/qr/batch");
    assert_eq!(qr.len(), 1);
    assert_eq!(qr[0]["sessionId"], "acct-1");
    assert_eq!(qr[0]["seq"], 1);
    let data_url = qr[0]["qr"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(
            data_url
                .strip_prefix("data:image/png;base64,")
                .expect("PNG data URL"),
        )
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let statuses = receiver.items("/whatsapp/status/batch");
    let lost = statuses
        .iter()
        .find(|s| s["sessionId"] == "acct-2")
        .expect("acct-2 status");
    assert_eq!(lost["status"], "inactive");
    assert_eq!(lost["priority"], "high");
    assert_eq!(lost["reason"], "connection_lost");
    assert!(lost["at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn legacy_endpoints_get_one_item_per_request_with_raw_qr() {
    let receiver = Receiver::start().await.unwrap();
    let settings = settings(
        &receiver,
        &[
            "--legacy-endpoints",
            "--qr-format",
            "raw",
            "--resync-interval-s",
            "0",
        ],
    );
    let mut registry = gateway::metrics::new_registry();
    let pipeline = Pipeline::start(&settings, None, &mut registry, None)
        .await
        .unwrap();
    send_one_of_each(&pipeline).await;
    wait_until("3 requests", Duration::from_secs(10), || {
        let n = receiver.received().len();
        async move {
            if n >= 3 {
                Ok(())
            } else {
                Err(format!("{n} requests"))
            }
        }
    })
    .await
    .unwrap();
    pipeline.shutdown(Vec::new(), Duration::from_secs(5)).await;
    let received = receiver.received();
    assert!(
        received
            .iter()
            .all(|r| r.items.len() == 1 && (r.path == "/qr" || r.path == "/whatsapp/status"))
    );
    let qr = receiver.items("/qr");
    assert_eq!(qr[0]["qr"], "2@ref,noise,identity,adv,1", "raw QR string");
    assert!(
        received.iter().all(|r| !r.batch_id.is_empty()),
        "each item carries its own batchId"
    );
}
