"""Where a session's editor listens, and the token it wants.

JupyterLab listens on a Unix socket in a directory of the workload's own (under the temporary
directory: a socket's path must stay under about 100 bytes), not on a TCP port: local workloads
share the host's network, and a port on 127.0.0.1 would be open to every other workload there.
The directory is bound into the workload's sandbox (or container) and nobody else's. JupyterLab
also wants a token, derived from the site key and the workload id (so it survives a restart of
the appliance without being stored): the editors' proxy adds it to every request it forwards, so
the browser never holds it.
"""

from __future__ import annotations

import hmac
import os
import shutil
import stat
import tempfile
from hashlib import sha256
from pathlib import Path

from cml_appliance.core import ownership

SOCKET_VARIABLE = "CML_EDITOR_SOCKET"
PORT_VARIABLE = "CML_EDITOR_PORT"
# In a pod, whose 127.0.0.1 is its own, the editor listens there on this port, behind the pod's
# relay (engines/port_relay.py), which admits the appliance alone.
POD_PORT = 8090
SOCKET_NAME = "editor.sock"
DIR_PREFIX = "cml-editor-"


class EditorSockets:
    def __init__(self, secret_key: str, root: Path | None = None):
        self.secret_key = secret_key
        self.root = root or Path(tempfile.gettempdir())

    def directory(self, workload_id: str) -> Path:
        return self.root / f"{DIR_PREFIX}{workload_id}"

    def socket(self, workload_id: str) -> Path:
        return self.directory(workload_id) / SOCKET_NAME

    def token(self, workload_id: str) -> str:
        return hmac.new(self.secret_key.encode(), f"editor-token:{workload_id}".encode(), sha256).hexdigest()

    def prepare(self, workload_id: str, *, in_pod: bool = False) -> dict[str, str]:
        """A fresh directory for the socket (refusing one that someone else made first, in a
        temporary directory anyone may write to), and the variables the editor reads. A pod's
        editor listens on its own 127.0.0.1 instead (POD_PORT): no directory."""
        common = {"JUPYTER_TOKEN": self.token(workload_id), "CML_EDITOR_BASE_URL": f"/editors/{workload_id}/"}
        if in_pod:
            return common | {PORT_VARIABLE: str(POD_PORT), "JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime"}
        folder = self.directory(workload_id)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            info = os.lstat(folder)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (os.getuid(), ownership.WORKLOAD_UID):
                raise OSError(f"{folder} exists and is not the appliance's") from None
        ownership.give(folder)  # as root, workloads run as uid 8536
        # Jupyter's own runtime files (kernel connection files) beside the socket, not in the project.
        return common | {SOCKET_VARIABLE: str(folder / SOCKET_NAME), "JUPYTER_RUNTIME_DIR": str(folder / "runtime")}

    def remove(self, workload_id: str) -> None:
        shutil.rmtree(self.directory(workload_id), ignore_errors=True)
