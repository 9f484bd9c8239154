# syntax=docker/dockerfile:1
#
# The production image of mailgate: one static binary on distroless/static (CA certificates,
# /etc/passwd with the nonroot user 65532, no shell, no package manager).
#
#   docker build -t mailgate:0.1.0 .
#   docker run --rm -p 50051:50051 mailgate:0.1.0        # SQLite + file drop under /data
#
# Stages: chef (Rust + cargo-chef) -> planner (dependency recipe) -> cacher (dependencies
# only, cached while Cargo.toml/Cargo.lock do not change) -> builder (the crate) -> runtime.
#
# The binary is statically linked against glibc (crt-static on x86_64-unknown-linux-gnu; the
# musl target would need rustup downloads). TLS is rustls with compiled-in webpki roots, and
# SQLite is bundled, so nothing from the system is loaded at run time.
#
# .ci/image-check.sh builds an equivalent image (Containerfile.local) from a binary built on
# the host, for machines that cannot pull base images; keep the runtime instructions of both
# files identical (.ci/deploy-checks.sh compares them).

ARG RUST_VERSION=1.95
ARG CARGO_CHEF_VERSION=0.1.77

FROM rust:${RUST_VERSION}-bookworm AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src
# Only the target's artifacts are linked statically: with an explicit --target (below, the
# same in cook and build so the cache matches), build scripts and proc-macros are built for
# the host without these flags.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS cacher
COPY --from=planner /src/recipe.json recipe.json
# Build settings for the dependencies too (the bundled SQLite's flags, jemalloc's
# built-in settings).
COPY .cargo/config.toml .cargo/config.toml
RUN cargo chef cook --release --locked --target x86_64-unknown-linux-gnu --bin mailgate \
    --recipe-path recipe.json

FROM cacher AS builder
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-gnu --bin mailgate \
    && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/mailgate /out/mailgate \
    && install -d -m 0750 /out/data \
    && /out/mailgate --version

FROM gcr.io/distroless/static-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="mailgate" \
      org.opencontainers.image.description="Multi-tenant gRPC email service: tenant SMTP profiles, durable delivery, email log" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/mailgate /mailgate
COPY --from=builder --chown=65532:65532 /out/data /data
# --- runtime instructions: keep identical in Containerfile.local ---
ENV MAILGATE_LISTEN_ADDR=0.0.0.0:50051 \
    MAILGATE_DATA_DIR=/data \
    MAILGATE_LOG__FORMAT=json
USER 65532:65532
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/mailgate", "healthcheck", "--addr", "127.0.0.1:50051"]
ENTRYPOINT ["/mailgate"]
CMD ["serve"]
# --- end of runtime instructions ---
