#!/usr/bin/env bash
# `make image`: build the cgb-worker image with docker or podman, whichever works here.
#
# The Dockerfile's base is the official python:3.11-slim-bookworm. Where no registry is reachable (podman
# only), a stand-in for it is made once, cached under the official name, and reused:
#   1. a bookworm root file system from `debootstrap --variant=minbase`, with python3, python3-venv and
#      ca-certificates, from the Debian mirror apt is configured with;
#   2. in it, a venv at /usr/local/python whose bin comes first on PATH, so that `python` and `pip` resolve
#      as in the official image;
#   3. this machine's CA bundle and SSL_CERT_FILE, since the build's pip and uv reach PyPI through it;
#   4. `podman import` under the official image's name.
# The image is built in the Docker format, which keeps HEALTHCHECK (the OCI format drops it).
set -euo pipefail

IMAGE=${IMAGE:-cgb-worker:latest}
BASE=docker.io/library/python:3.11-slim-bookworm
cd "$(dirname "$0")/.."

if docker info >/dev/null 2>&1; then
  if [ "${1:-}" = --sizes ]; then
    docker image inspect --format 'image: {{.Size}} bytes' "$IMAGE"
    exit 0
  fi
  echo "image: building $IMAGE with docker"
  exec docker build -t "$IMAGE" .
fi
if ! command -v podman >/dev/null; then
  echo "image: neither a Docker engine nor podman is here; 'make container-bin' installs podman (as root)" >&2
  exit 1
fi
# runc: podman's default crun refuses this machine's hybrid cgroups. The ulimits: podman's defaults exceed
# the hard limits here.
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

if [ "${1:-}" = --sizes ]; then
  total=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
  base=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$BASE")
  echo "image: $IMAGE is $((total / 1000000)) MB; its own layers above the base (the venv: dependencies and" \
    "cgb-worker) $(((total - base) / 1000000)) MB; the base $((base / 1000000)) MB"
  exit 0
fi

standin() {
  local root mirror
  root=$(mktemp -d /tmp/cgb-base-XXXXXX)
  trap 'rm -rf "$root"' RETURN
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "image: no registry reachable for $BASE; making a stand-in from $mirror (once; it is cached)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
  chroot "$root" python3 -m venv /usr/local/python
  local bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  if [ -f "$bundle" ]; then
    cp "$bundle" "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$BASE" >/dev/null
}

if ! "${PODMAN[@]}" image exists "$BASE"; then
  if timeout 120 "${PODMAN[@]}" pull -q "$BASE" >/dev/null 2>&1; then
    echo "image: pulled $BASE"
  else
    standin
  fi
else
  echo "image: using the cached $BASE"
fi
echo "image: building $IMAGE with podman"
"${PODMAN[@]}" build --pull=never --network host --format docker "${LIMITS[@]}" -t "$IMAGE" .
