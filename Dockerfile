# message-dispatcher container image.
#
#   docker build -t message-dispatcher:local .
#   docker run --rm message-dispatcher:local --version
#
# Two stages: a Rust builder, then a small Debian runtime holding only the
# binary and the CA bundle, running as an unprivileged user (uid/gid 10001)
# that the Helm chart's securityContext also names. The process writes
# nothing to disk, so a read-only root filesystem works.

# ---------------------------------------------------------------- builder ---
FROM rust:1-slim-bookworm AS builder
WORKDIR /build

# 1) Dependencies only. This layer depends on Cargo.toml and Cargo.lock alone,
#    so editing the source reuses the compiled dependency graph. The stub
#    main.rs/lib.rs/build.rs let cargo resolve and build every dependency;
#    the stub crate's own artefacts are deleted afterwards so the real build
#    below can never pick them up (cargo compares mtimes, and the stubs are
#    newer than the copied sources). If Cargo.toml ever declares targets at
#    other paths ([[bin]], [[bench]], [lib] path = ...), stub those here too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && echo 'fn main() {}' > build.rs \
    && cargo build --release --locked \
    && rm -rf src build.rs \
        target/release/message-dispatcher \
        target/release/message-dispatcher.d \
        target/release/.fingerprint/message-dispatcher-* \
        target/release/build/message-dispatcher-* \
        target/release/deps/message_dispatcher-* \
        target/release/deps/libmessage_dispatcher-* \
        target/release/libmessage_dispatcher.*

# 2) The real source. sql/ is embedded into the binary with include_str!.
COPY build.rs ./
COPY sql ./sql
COPY src ./src
# .git is not in the build context; pass the commit for --version / build_info:
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
RUN cargo build --release --locked \
    && install -m 0755 target/release/message-dispatcher /usr/local/bin/message-dispatcher \
    && /usr/local/bin/message-dispatcher --version

# ---------------------------------------------------------------- runtime ---
FROM debian:bookworm-slim AS runtime

# ca-certificates is the only package: TLS to the SMS provider, PostgreSQL
# (DB_SSLMODE=require/verify-full) and Redis (rediss://) trusts the system roots.
# DL3008 (pin apt package versions) is ignored on purpose: pinning
# ca-certificates to one Debian revision breaks the build as soon as the
# archive moves on, and we want the current CA bundle and its security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin dispatcher

COPY --from=builder /usr/local/bin/message-dispatcher /usr/local/bin/message-dispatcher

LABEL org.opencontainers.image.title="message-dispatcher" \
      org.opencontainers.image.description="Drains a PostgreSQL queue of SMS messages into an SMS provider at a controlled rate; one fenced leader among many replicas" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric user so Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 10001:10001
ENV SERVER_PORT=8080 \
    LOG_FORMAT=json
EXPOSE 8080

# `healthcheck` GETs http://127.0.0.1:${SERVER_PORT}/health/ready and exits 0
# on 200, so no curl is needed in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["message-dispatcher", "healthcheck"]

# SIGTERM (the default stop signal) starts the graceful shutdown: in-flight
# sends finish within SHUTDOWN_TIMEOUT, then the Redis lease is released.
ENTRYPOINT ["message-dispatcher"]
CMD ["serve"]
