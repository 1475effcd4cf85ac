#!/bin/bash
# Build localhost/cml-runtime-jupyterlab:3.11, the container runtime whose sessions offer
# JupyterLab: Debian's Python (scripts/build-base-image.sh, no registry needed) plus JupyterLab
# from PyPI, installed on this host (which reaches the package index) into a folder that the image
# copies in: nothing is pulled and nothing runs in a build container. The host's Python must be
# 3.11 like the image's (its wheels must fit). Idempotent: exits at once if the image exists
# (FORCE=1 rebuilds). Needs root (podman, as the tests run it).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME_IMAGE=${RUNTIME_IMAGE:-localhost/cml-runtime-jupyterlab:3.11}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
PYTHON=${PYTHON:-python3}
FORCE=${FORCE:-0}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/config/podman/containers.conf}

log() { echo "build-runtime-image: $*" >&2; }

if [ "$FORCE" != 1 ] && podman image exists "$RUNTIME_IMAGE"; then log "$RUNTIME_IMAGE already exists"; exit 0; fi
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$version" = 3.11 ] || { log "$PYTHON is Python $version: the image's is 3.11 (set PYTHON)"; exit 1; }
IMAGE="$BASE_IMAGE" "$REPO/scripts/build-base-image.sh"

exec 9>"${TMPDIR:-/tmp}/build-runtime-image.lock"
flock 9
if [ "$FORCE" != 1 ] && podman image exists "$RUNTIME_IMAGE"; then log "$RUNTIME_IMAGE built by a concurrent run"; exit 0; fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/cml-runtime-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# JupyterLab's version is the tests' (requirements-workload.txt), so both editors are the same.
spec=$(grep -E '^jupyterlab==' "$REPO/requirements-workload.txt")
log "installing $spec for the image"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile --target "$WORK/site" "$spec"
# Data files (JupyterLab's assets) go where Debian's Python looks for them; console scripts and
# the kernel spec (whose "python" Debian's image lacks: ipykernel's own spec uses python3) stay out.
mkdir -p "$WORK/share"
cp -a "$WORK/site/share/jupyter" "$WORK/share/jupyter"
rm -rf "$WORK/share/jupyter/kernels" "$WORK/site/share" "$WORK/site/bin"
cat > "$WORK/Containerfile" <<CONTAINERFILE
FROM $BASE_IMAGE
COPY site /usr/local/lib/python3.11/dist-packages
COPY share /usr/local/share
CONTAINERFILE
podman build --pull=never --format docker -t "$RUNTIME_IMAGE" "$WORK" >&2
log "built $RUNTIME_IMAGE"
