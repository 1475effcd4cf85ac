#!/usr/bin/env bash
# Install cml-appliance into .venv and start it. With no CML_DATABASE_URL it runs on an embedded
# Postgres kept in the data dir (./.cml-data by default) and the local engine.
# Open http://127.0.0.1:8080 and create the administrator on the first visit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check .
exec .venv/bin/cml-appliance serve "$@"
