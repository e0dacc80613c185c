# syntax=docker/dockerfile:1
# The image the chart runs (`image.repository`): both binaries, gateway and operator.
#   docker build -t ghcr.io/<you>/whatsapp-gateway:0.1.0 .
# Not built by CI: the machines CI runs on have no container engine. The build step is the same
# `cargo build --release --locked` that the tests and the bench run.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway -p operator \
 && cp target/release/gateway target/release/operator /usr/local/bin/

# Same Debian as the builder (glibc); CA certificates for the backend's and WhatsApp's TLS.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/gateway /usr/local/bin/operator /usr/local/bin/
# The chart runs both as this user with a read-only root filesystem; neither writes files.
USER 65532:65532
EXPOSE 4000 8080
CMD ["/usr/local/bin/gateway", "standalone"]
