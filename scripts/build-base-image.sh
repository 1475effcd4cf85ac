#!/bin/bash
# Build localhost/debian-python:bookworm without pulling from any registry:
# debootstrap a minimal Debian, add python3 + venv + CA certificates, `podman import` it.
# Used as BASE_IMAGE for the Dockerfile on hosts that cannot reach Docker Hub:
#   podman build --pull=never --format docker \
#     --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t localhost/cml-appliance .
# Idempotent: exits at once if the image already exists (FORCE=1 rebuilds). Needs root.
# Recipe and timings: shared/reference/local-images.md (about a minute, ~116 MB).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/debian-python:bookworm}
SUITE=${SUITE:-bookworm}
PKGS=${PKGS:-"python3 python3-venv ca-certificates"}
FORCE=${FORCE:-0}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/config/podman/containers.conf}
export DEBIAN_FRONTEND=noninteractive

log() { echo "build-base-image: $*" >&2; }

exists() { podman image exists "$IMAGE"; }
if [ "$FORCE" != 1 ] && exists; then log "$IMAGE already exists"; exit 0; fi
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap, chroot)"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }

# Serialise concurrent runs (two test sessions at once); re-check after taking the lock.
exec 9>"${TMPDIR:-/tmp}/build-base-image.lock"
flock 9
if [ "$FORCE" != 1 ] && exists; then log "$IMAGE built by a concurrent run"; exit 0; fi

# Mirrors: from the environment, else the host's apt sources (deb822 URIs: lines first,
# then one-line sources.list), else deb.debian.org. The security archive is the URI
# containing "security".
apt_uris() {
  { grep -hiE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//I' | tr ' ' '\n'
    grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
  } | grep -E '^https?://' | sed -E 's#/+$##' || true
}
MIRROR=${MIRROR:-$(apt_uris | grep -v security | head -n1)}
SECMIRROR=${SECMIRROR:-$(apt_uris | grep security | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECMIRROR=${SECMIRROR:-http://deb.debian.org/debian-security}
log "mirror $MIRROR, security $SECMIRROR"

ROOT=$(mktemp -d "${TMPDIR:-/var/tmp}/debian-python-root.XXXXXX")
cleanup() {
  umount "$ROOT/proc" 2>/dev/null || true
  rm -rf --one-file-system "$ROOT"   # --one-file-system: never follow into a mounted /proc
}
trap cleanup EXIT

debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR"
cat > "$ROOT/etc/apt/sources.list" <<SRC
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECMIRROR $SUITE-security main
SRC
# Keep docs/man/locales out of the image (~60 MB).
cat > "$ROOT/etc/dpkg/dpkg.cfg.d/01-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
SLIM

mount -t proc proc "$ROOT/proc"
chroot "$ROOT" apt-get update -q
chroot "$ROOT" apt-get -y -q upgrade          # security updates (debootstrap only sees $SUITE main)
# shellcheck disable=SC2086
chroot "$ROOT" apt-get install -y -q --no-install-recommends $PKGS
# Trust the host's extra CAs: egress here goes through a TLS-intercepting proxy, so HTTPS
# (pip in `podman build`) fails without them. They are public certificates, not secrets.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
chroot "$ROOT" update-ca-certificates
chroot "$ROOT" apt-get clean
umount "$ROOT/proc"

rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
       "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/*
find "$ROOT/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$ROOT" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
: > "$ROOT/etc/hostname"; rm -f "$ROOT/etc/resolv.conf"   # podman supplies both at run time

# `podman import` sets no PATH; the SSL/PIP variables make certifi-based clients
# (requests, httpx, pip < 24.2) use the system store that now holds the host CA.
CA=/etc/ssl/certs/ca-certificates.crt
tar --numeric-owner -C "$ROOT" -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "ENV SSL_CERT_FILE=$CA" --change "ENV REQUESTS_CA_BUNDLE=$CA" --change "ENV PIP_CERT=$CA" \
  --change 'CMD ["python3"]' - "$IMAGE"
log "built $IMAGE"
