# syntax=docker/dockerfile:1

# The datagate container image. It needs BuildKit, the default builder since
# Docker 23:
#
#   docker build -t datagate:dev .
#   docker run --rm datagate:dev --help
#
# Two stages. The builder compiles the release binary with the official Rust
# image. The runtime is distroless: glibc, libgcc, CA certificates and tzdata,
# with no shell and no package manager, running as the non-root user
# nonroot (UID/GID 65532).
#
# The two stages must share a Debian release (bookworm = Debian 12), so that
# the binary finds the glibc it was linked against.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# SQLX_OFFLINE: datagate checks its SQL at run time only (sqlx::query, never
# the query! macros), so neither a database (DATABASE_URL) nor `.sqlx`
# offline data is needed to build it. Setting it keeps that true: if a
# query! macro is ever added without committed `cargo sqlx prepare` output,
# the build fails here instead of trying to reach a database.
# protoc is not installed: build.rs uses the one vendored by
# protoc-bin-vendored.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never

# .dockerignore lets only the sources in: Cargo.toml/Cargo.lock, build.rs,
# service/, proto/, config/ and migrations/ (compiled in by include_str! and
# sqlx::migrate!), and benches/ and tests/api/, which Cargo wants to exist
# because the manifest declares them.
COPY . .

# The cache mounts keep the crates.io downloads and the compiled dependencies
# from one build to the next, so a change to datagate's own code recompiles
# only datagate. They are not part of any layer, hence the copy out of
# target/.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin datagate \
    && cp target/release/datagate /usr/local/bin/datagate


FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

LABEL org.opencontainers.image.title="datagate" \
      org.opencontainers.image.description="gRPC data-access service for users, orders, product search and market analysis" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /usr/local/bin/datagate /usr/local/bin/datagate

# No configuration file is copied: the defaults (config/default.toml) are
# compiled into the binary, which reads no file unless given --config FILE.
# Configure the container with DATAGATE__SECTION__KEY environment variables
# (README.md, "Configuration"), or mount a TOML file and pass --config.
# The binary writes no files, so a read-only root filesystem works.

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

# 50051: gRPC (with grpc.health.v1.Health and reflection).
# 9090: Prometheus metrics, GET /metrics.
EXPOSE 50051 9090

# Exec form, since there is no shell: `datagate healthcheck` asks the gRPC
# health service on 127.0.0.1:50051 and exits 0 on SERVING, 1 otherwise. If
# DATAGATE__SERVER__PORT is changed, override the healthcheck with --addr.
# Kubernetes ignores this and uses the probes in k8s/.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/datagate", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/datagate"]
CMD ["serve"]
