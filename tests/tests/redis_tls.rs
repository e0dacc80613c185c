//! Redis over TLS: a `rediss://` URL makes the gateway connect with TLS, verifying the server
//! against the system's trust store (here a test CA given through `SSL_CERT_FILE`, as a pod would
//! mount a private CA), and a server it cannot verify is not used.

use std::path::Path;
use std::time::Duration;

use test_support::gateway::GatewayProcess;
use test_support::redis::TlsFiles;
use test_support::{RedisServer, wait_until};

fn openssl(args: &[&str], dir: &Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it.
fn certificates(dir: &Path) -> TlsFiles {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=wa-test-ca",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        dir,
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
        dir,
    );
    TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
    }
}

/// The `redis` field of the gateway's `/readyz`.
async fn redis_readiness(gateway: &GatewayProcess) -> String {
    let (_, body) = gateway.get("/readyz").await.unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    body["redis"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn rediss_urls_connect_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let files = certificates(dir.path());
    let redis = RedisServer::start_tls(files.clone()).await.unwrap();
    let url = redis.tls_url().unwrap();
    let ca = files.ca.display().to_string();
    // An empty directory of extra roots: only the test CA (or nothing) is trusted.
    let no_roots = tempfile::tempdir().unwrap();
    let no_roots = no_roots.path().display().to_string();

    let trusting = GatewayProcess::start(
        &["standalone", "--simulate", "3", "--redis-url", &url],
        &[("SSL_CERT_FILE", &ca), ("SSL_CERT_DIR", &no_roots)],
    )
    .await
    .unwrap();
    wait_until("Redis ready over TLS", Duration::from_secs(20), || {
        let trusting = &trusting;
        async move {
            match redis_readiness(trusting).await.as_str() {
                "ok" => Ok(()),
                other => Err(format!("redis: {other}")),
            }
        }
    })
    .await
    .unwrap();
    // The sessions' ownership locks went through the TLS port: they are in this Redis.
    let port = redis.port().to_string();
    wait_until(
        "session keys written over TLS",
        Duration::from_secs(20),
        || {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &port, "--scan", "--pattern", "wa:*"])
                .output();
            async move {
                let out = out.map_err(|e| e.to_string())?;
                if out.stdout.is_empty() {
                    Err("no wa:* keys yet".to_string())
                } else {
                    Ok(())
                }
            }
        },
    )
    .await
    .unwrap();

    // The same server without its CA in the trust store: the certificate is refused, the
    // gateway reports Redis unreachable and keeps serving (it never falls back to plaintext).
    let distrusting = GatewayProcess::start(
        &["standalone", "--simulate", "3", "--redis-url", &url],
        &[("SSL_CERT_FILE", "/dev/null"), ("SSL_CERT_DIR", &no_roots)],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(redis_readiness(&distrusting).await, "unreachable");
    let log = distrusting.log();
    assert!(
        log.to_lowercase().contains("certificate") || log.to_lowercase().contains("tls"),
        "the log should say why: {log}"
    );
}
