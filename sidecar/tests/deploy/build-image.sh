#!/usr/bin/env bash
# Builds the image the deployment tests run (sidecar/tests/deploy/container.rs and
# manifests.rs): the Dockerfile's `prebuilt` target around an `airlock` binary that is
# already built, on a Debian 12 base made from Debian's packages. No container
# registry is needed, which is how CI (and any machine without one) builds it.
#
#   sidecar/tests/deploy/build-image.sh [BINARY] [TAG]
#
# BINARY defaults to target/debug/airlock (what `cargo test` runs), TAG to
# localhost/airlock:test (what the tests run; AIRLOCK_TEST_IMAGE names another).
# Needs podman, runc and mmdebstrap (Debian: apt-get install podman runc mmdebstrap).
#
# The base image is the one the Dockerfile's runtime stage names, made once with
# mmdebstrap (2 to 3 minutes here) and then reused. The image gets the binary's SHA-256 as
# a label, so a test can tell an image built from another binary.
set -euo pipefail
cd "$(dirname "$0")/../../.."
binary=${1:-target/debug/airlock}
tag=${2:-${AIRLOCK_TEST_IMAGE:-localhost/airlock:test}}
base=$(sed -n 's/^ARG DEBIAN_IMAGE=//p' Dockerfile)
[ -n "$base" ] || { echo "the Dockerfile names no DEBIAN_IMAGE" >&2; exit 1; }
[ -x "$binary" ] || { echo "$binary: no such executable; build it first (cargo build -p airlock)" >&2; exit 1; }

# These machines' kernel refuses crun's cgroup setup and rlimits above 1024; runc with
# cgroupfs and explicit ulimits works (the tests run containers the same way).
podman=(podman --runtime runc --cgroup-manager=cgroupfs)

if ! "${podman[@]}" image exists "$base"; then
  echo "making $base from Debian's packages (mmdebstrap)"
  mmdebstrap --quiet --variant=apt --include=ca-certificates,libssl3 bookworm - \
    | "${podman[@]}" import - "$base" >/dev/null
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/airlock"
sha=$(sha256sum "$binary" | cut -d' ' -f1)
"${podman[@]}" build --quiet --isolation=chroot --network=host \
  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --target prebuilt --build-context airlock-binary="$context" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --label io.airlock.binary.sha256="$sha" \
  --tag "$tag" . >/dev/null
echo "built $tag from $binary (sha256 $sha)"
