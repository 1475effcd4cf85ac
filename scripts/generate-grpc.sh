#!/usr/bin/env bash
# Regenerate the gRPC code from cml_appliance/grpc/protos (the generated files are committed).
# Needs grpcio-tools (requirements-test.txt); grpclib's plugin writes the *_grpc.py service code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${OUT:-cml_appliance/grpc/generated}
rm -rf "$out" && mkdir -p "$out"
PATH="$(dirname "$PY"):$PATH" "$PY" -m grpc_tools.protoc -I cml_appliance/grpc/protos --python_out="$out" --grpclib_python_out="$out" \
  cml_appliance/grpc/protos/cml/v1/appliance.proto
# The generated modules import each other as top-level "cml.v1...": make them a package of ours.
touch "$out/__init__.py" "$out/cml/__init__.py" "$out/cml/v1/__init__.py"
sed -i -E 's/(^|[^._a-z])cml\.v1\.appliance_pb2/\1cml_appliance.grpc.generated.cml.v1.appliance_pb2/g' "$out/cml/v1/appliance_grpc.py"
echo "generated into $out"
