#![forbid(unsafe_code)]
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Both of rustls' providers are compiled in (different dependencies ask for each), so it
    // cannot pick one by itself; a TLS client built from its defaults (fred's, for rediss://)
    // would panic. Use aws-lc-rs, which kube is built with.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = operator::app::Args::parse();
    operator::app::run(args)
        .await
        .map_err(|e| anyhow::anyhow!("operator: {e}"))
}
