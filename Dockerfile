# The cml-appliance image: `docker run -e CML_DATABASE_URL=postgresql://... -p 8080:8080 -p 8081:8081 -p 8082:8082 IMAGE`.
#
# Works unchanged on a normal machine (pulls python:3.11-slim) and offline on a
# Debian base built locally by scripts/build-base-image.sh:
#   podman build --pull=never --format docker \
#     --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t localhost/cml-appliance .
# --format docker: the OCI image format has no HEALTHCHECK, podman would drop it.
# Add --network host where bridge networking is unavailable (no iptables on the host).
# Only `python3 -m venv` and the venv's pip are used, so both bases work: Debian's
# python3 has no global pip/`python` and is PEP 668-managed.
ARG BASE_IMAGE=python:3.11-slim

# ---- deps: a venv with the dependencies only. Its inputs are setup.cfg/pyproject.toml,
# so code changes reuse it (and its large COPY into the runtime stage) from the cache.
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.tom[l] setup.cf[g] scripts/list-requirements.py /src/
RUN python3 /src/list-requirements.py /src > /tmp/requirements.txt \
 && if [ -s /tmp/requirements.txt ]; then pip install -r /tmp/requirements.txt; fi

# ---- wheel: the app itself, built from the full source tree (kept out of the final image).
FROM deps AS wheel
COPY . /src
RUN pip wheel --no-deps --wheel-dir /wheels /src

# ---- runtime
FROM ${BASE_IMAGE}
# git: every project is a repository (the git server, build snapshots); docker-registry: the
# embedded OCI registry; bubblewrap: the local sandbox, where the container may make one.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends git docker-registry bubblewrap \
 && rm -rf /var/lib/apt/lists/*
# Fixed uid/gid so volume ownership is predictable across rebuilds and hosts.
ARG CML_UID=10001
RUN groupadd --system --gid ${CML_UID} cml \
 && useradd --system --no-log-init --uid ${CML_UID} --gid cml \
      --home-dir /var/lib/cml-appliance --no-create-home --shell /usr/sbin/nologin cml \
 && install -d -o cml -g cml -m 0750 /var/lib/cml-appliance
# The venv stays root-owned: the app cannot modify its own code.
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /tmp/wheels
# With deps: normally all satisfied already; anything list-requirements.py missed is
# still installed. The --help call fails the build on a broken entry point.
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels && cml-appliance --help > /dev/null
ENV HOME=/var/lib/cml-appliance \
    CML_HOST=0.0.0.0 \
    CML_PORT=8080 \
    CML_DATA_DIR=/var/lib/cml-appliance
# State lives in CML_DATA_DIR; mount a volume there to keep it (-v cml-data:/var/lib/cml-appliance).
# No VOLUME: each run would create an anonymous volume that outlives `rm` without -v.
WORKDIR /var/lib/cml-appliance
# 8080: the UI and the API; 8081: applications, on an origin of their own (CML_APPS_PORT);
# 8082: session editors (JupyterLab), on an origin of their own too (CML_EDITORS_PORT).
EXPOSE 8080 8081 8082
# No curl in the base images: probe with the stdlib. Follows CML_PORT so that
# `-e CML_PORT=...` (e.g. with --network host) keeps the check valid.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CML_PORT', '8080'), timeout=4)"]
USER cml
CMD ["cml-appliance", "serve"]
