#!/usr/bin/env bash
# Builds the Docker base image the face_age bento starts FROM, without Docker Hub:
# a minimal Debian (debootstrap from a Debian mirror) with Python and pip, imported with
# `docker import`. Idempotent: does nothing when the image already exists (--force rebuilds).
#
#   sudo scripts/base-image.sh [--force] [IMAGE]
#
# IMAGE defaults to bentofile.yaml's docker.base_image (no such line: nothing to do). Needs root,
# debootstrap and a Docker daemon. Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
# HOST_CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt).
#
# What BentoML's generated Dockerfile (bento v2, env/docker/Dockerfile) expects of a base image:
# - apt-get (it runs `apt-get update && apt-get install ... build-essential git` for distro debian);
# - `pip` on PATH, allowed to install into the system Python (it installs uv with pip);
# - the Python of bentofile.yaml's docker.python_version (uv makes /app/.venv from it; without
#   it uv would download a Python build from GitHub);
# - PATH set in the image (its `ENV PATH=/app/.venv/bin:${PATH}` extends the image's PATH, and
#   an imported image has none);
# - trust for whatever TLS the build meets on the way to PyPI: here a machine CA re-signs TLS, so
#   the host's CA certificates that Debian does not ship are added to the image's trust store,
#   and SSL_CERT_FILE points uv (which otherwise uses its own built-in roots) at that store.
set -euo pipefail
cd "$(dirname "$0")/.."

FORCE=0
if [ "${1:-}" = "--force" ]; then FORCE=1; shift; fi
bentofile_value() {  # bentofile_value KEY: the first `KEY: value` in bentofile.yaml, unquoted
  sed -n "s/^[[:space:]]*$1:[[:space:]]*[\"']\{0,1\}\([^\"'#[:space:]]*\).*/\1/p" bentofile.yaml | head -n1
}
IMAGE="${1:-$(bentofile_value base_image)}"
PYTHON_VERSION="$(bentofile_value python_version)"
SUITE=bookworm  # Debian 12: Python 3.11, the bentofile's docker.python_version
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_CA="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
# No base_image line (the README's path for a machine with Docker Hub): BentoML starts from
# python:<docker.python_version>-slim and there is nothing to build (`make container` runs this first).
if [ -z "$IMAGE" ]; then
  echo "bentofile.yaml names no docker.base_image: BentoML starts from python:${PYTHON_VERSION:-3}-slim," \
    "nothing to build (pass an image name to build one anyway)"
  exit 0
fi

# A dead daemon also fails `docker image inspect`: without this check, a missing daemon showed only at
# `docker import`, after minutes of debootstrap.
docker info >/dev/null 2>&1 || { echo "no Docker daemon reachable (docker info failed): start dockerd first" >&2; exit 1; }
if [ "$FORCE" = 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE exists"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }

WORK="$(mktemp -d /tmp/faceage-base.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
echo "debootstrap $SUITE from $MIRROR (a few minutes)"
debootstrap --variant=minbase --include=ca-certificates,python3,python3-pip \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
  tail -n 30 "$WORK/debootstrap.log" >&2
  exit 1
}

got="$(chroot "$ROOTFS" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -n "$PYTHON_VERSION" ] && [ "$got" != "$PYTHON_VERSION" ]; then
  echo "Debian $SUITE has Python $got, bentofile.yaml asks for $PYTHON_VERSION" >&2
  exit 1
fi

# apt inside the image (BentoML's Dockerfile runs apt-get update): the suite and its updates.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF

# The host's CA certificates that Debian's bundle lacks go to /usr/local/share/ca-certificates,
# so they survive any later update-ca-certificates (an apt upgrade of ca-certificates runs it).
python3 - "$HOST_CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt" "$ROOTFS/usr/local/share/ca-certificates" <<'EOF'
import re, sys
from pathlib import Path
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host, image, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
known = {"".join(c.split()) for c in pem.findall(image.read_text())}
extra = [c for c in pem.findall(host.read_text()) if "".join(c.split()) not in known] if host.is_file() else []
for i, cert in enumerate(extra):
    (out / f"host-ca-{i}.crt").write_text(cert + "\n")
print(f"{len(extra)} host CA certificate(s) added to the image")
EOF
chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1  # (rehash warns about the bundle file itself)

# PEP 668: a container's system Python is its own; let pip install into it (as python:*-slim does).
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
# Smaller image: no downloaded packages, package lists or docs.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*

tar -C "$ROOTFS" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change "LABEL org.opencontainers.image.description=\"Debian $SUITE + Python $got (scripts/base-image.sh)\"" \
  --change 'CMD ["/bin/bash"]' \
  - "$IMAGE" >/dev/null
docker run --rm "$IMAGE" python3 -c \
  'import ssl, sys; print("base image ok: Python", sys.version.split()[0], ssl.OPENSSL_VERSION)'
echo "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
