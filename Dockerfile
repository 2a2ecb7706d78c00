# syntax=docker/dockerfile:1
# floodgate: multi-stage build on the official Rust image, slim non-root runtime.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY settings ./settings
COPY patches ./patches
# Cache mounts keep the crate registry and compiled dependencies between
# builds (BuildKit and podman/buildah both honour them); the binary is copied
# out because the target directory stays in the cache, not the layer.
# Symbols are stripped here, not in Cargo.toml's release profile, so that a
# release build on a host keeps them for profilers.
RUN --mount=type=cache,id=floodgate-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=floodgate-target,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bin floodgate \
    && cp target/release/floodgate /usr/local/bin/floodgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin floodgate
COPY --from=build /usr/local/bin/floodgate /usr/local/bin/floodgate
# The built-in defaults, for reference: copy it, edit it, point FLOODGATE_CONFIG at it.
COPY settings/default.toml /etc/floodgate/default.toml
USER floodgate
# In a container the admin endpoints must be reachable by the orchestrator;
# publish 9000 only where you want it (compose publishes it on the host's
# loopback only).
ENV FLOODGATE_LISTEN=0.0.0.0:8000 \
    FLOODGATE_ADMIN_LISTEN=0.0.0.0:9000
EXPOSE 8000 9000
# No curl in the image: the binary probes its own /healthz.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/floodgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/floodgate"]
