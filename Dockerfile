# Airlock's container image (docs/container.md).
#
#   docker build -t airlock .                     # from source: the `build` stage
#   docker build --target prebuilt \
#       --build-context airlock-binary=target/release -t airlock .
#                                                 # an `airlock` built elsewhere
#
# Both end in the same `runtime` stage: Debian 12 with the two shared libraries the
# binary needs beyond glibc (libssl3, ca-certificates for verify-full TLS), a fixed
# non-root user (65532:65532), a configuration with the safe volume layout, and no
# write to the root filesystem (run it with --read-only; every write goes to the
# volumes).

ARG RUST_VERSION=1.95.0
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

# ---------------------------------------------------------------------------------
# build: the workspace's own sources and locked dependencies, release profile.
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG RUST_VERSION
# rust-toolchain.toml pins this same release and also lists rustfmt and clippy,
# which a build does not need: naming the toolchain keeps rustup from fetching them.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
# The caches keep crates and build output between builds of the same builder; the
# binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p airlock --bin airlock \
 && install -D -m 0755 target/release/airlock /out/airlock

# ---------------------------------------------------------------------------------
# runtime: shared by the two images below.
FROM ${DEBIAN_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="airlock" \
      org.opencontainers.image.description="Transactional write-queue sidecar for AI agents: intents in, policy, review, exactly-once apply, outcomes out." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/airlock" \
      org.opencontainers.image.documentation="https://example.invalid/airlock/blob/main/docs/container.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
# Versions are not pinned: Debian 12's security updates replace them within the
# release, and a pin would break the build on the day one lands. Pin the base image
# by digest to make a build reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o 65532 -g 65532 -m 0770 /airlock/intents \
 && install -d -o 65532 -g 65532 -m 0750 /airlock/results \
 && install -d -o 65532 -g 65532 -m 0700 /var/lib/airlock
# The directories above are where examples/container/airlock.toml puts intents,
# results and state. A fresh named volume mounted on one of them starts with its
# owner and mode: Airlock's user owns all three, an agent in group 65532 may write
# intents and read results, and no one else sees anything.
COPY examples/container/airlock.toml /etc/airlock/airlock.toml
ENV AIRLOCK_CONFIG=/etc/airlock/airlock.toml
USER 65532:65532
WORKDIR /var/lib/airlock
# The review endpoint (API, web page and, until the metrics listener exists, the
# /healthz probe).
EXPOSE 8080
# SIGTERM (the default stop signal) drains: no new intent is taken, the step in
# flight finishes, pending outcomes are written, exit 0 within [shutdown] grace_ms.
ENTRYPOINT ["airlock"]
CMD ["run"]

# ---------------------------------------------------------------------------------
# prebuilt: packages a binary built outside this file (CI, release pipelines). Give
# the directory holding `airlock` as the build context named airlock-binary; it must
# be built for Debian 12's glibc (any build on Debian 12, or an older glibc).
FROM runtime AS prebuilt
# airlock-binary is a named build context (--build-context), not a stage of this file.
# hadolint ignore=DL3022
COPY --from=airlock-binary --chmod=0555 airlock /usr/local/bin/airlock

# ---------------------------------------------------------------------------------
# The default target: the binary the build stage compiled.
FROM runtime
COPY --from=build --chmod=0555 /out/airlock /usr/local/bin/airlock
