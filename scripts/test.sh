#!/usr/bin/env bash
# Install what the tests need and run the whole suite.
#  - as root, missing Debian packages are installed (podman, runc, docker-registry, chromium, ...);
#  - Python packages go into .venv from requirements-test.txt (pinned);
#  - DATABASE_URL is used when set; otherwise the tests start an embedded Postgres.
# Artifacts (screenshots, logs) go to ./artifacts. Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

DEBS=(git podman runc conmon catatonit netavark aardvark-dns slirp4netns uidmap fuse-overlayfs
      iptables docker-registry busybox-static debootstrap chromium ca-certificates curl bubblewrap)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in "${DEBS[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt -e .
# The workloads' own Python (mlflow, scikit-learn, jupyterlab): a venv apart, so that MLflow's
# dependencies never decide the appliance's.
[ -x .venv-workload/bin/python ] || "$PYTHON" -m venv .venv-workload
.venv-workload/bin/pip install -q --disable-pip-version-check -r requirements-workload.txt

# Podman with the settings these machines need (runc, cgroupfs, lowered ulimits), never /etc.
export CONTAINERS_CONF="$PWD/config/podman/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$PWD/config/podman/registries.conf"
export CML_ARTIFACTS_DIR="${CML_ARTIFACTS_DIR:-$PWD/artifacts}"
mkdir -p "$CML_ARTIFACTS_DIR"

# Two pytest-xdist workers by default: about 11 minutes instead of 17 (a file's tests stay on one
# worker; tests that use the test cluster take turns, see tests/conftest.py).
# CML_TEST_WORKERS=0 runs one process (for --pdb, or to read a failure's output in order).
set +e
.venv/bin/python -m pytest -n "${CML_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected: that is a failure"
  exit 1
fi
exit "$rc"
