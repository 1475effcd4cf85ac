"""What the Kubernetes engine asks the cluster for, and how it reads pods back: pure functions,
no I/O, so each rule (names, security, quota, how a pod's state reads in CML's words) is tested
on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from cml_appliance.workloads import states

SITE_LABEL = "cml.appliance/site"
WORKLOAD_LABEL = "cml.appliance/workload"
PROJECT_LABEL = "cml.appliance/project"
KIND_LABEL = "cml.appliance/kind"
MANAGED_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "cml-appliance"
# The appliance's own pod, when it runs in the cluster: the one peer workload pods admit.
APPLIANCE_POD_LABEL = "app.kubernetes.io/name"
APPLIANCE_POD_VALUE = "cml-appliance"

CONTAINER_HOME = "/home/cdsw"
TLS_MOUNT = "/run/cml/tls"
CDSW_UID = 8536
MAIN_CONTAINER = "main"
RELAY_CONTAINER = "relay"
# Waiting reasons after which a pod never starts: fail at once instead of waiting on backoff.
IMAGE_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                            "RegistryUnavailable"})
CONFIG_FAILURES = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
_DNS_LABEL_MAX = 63


def namespace_for(prefix: str, username: str) -> str:
    """`<prefix>-user-<slug>`. The slug is the user name when it already is a DNS label; any other
    name (capitals, dots, too long) gets a hash of the exact name appended, so two users whose
    names slug alike ("John.Doe", "john-doe") never share a namespace."""
    base = f"{prefix}-user-"
    slug = re.sub(r"[^a-z0-9-]+", "-", username.lower()).strip("-")
    if slug == username and len(base + slug) <= _DNS_LABEL_MAX:
        return base + slug
    digest = hashlib.sha256(username.encode()).hexdigest()[:8]
    room = _DNS_LABEL_MAX - len(base) - len(digest) - 1
    slug = slug[:room].strip("-") or "u"
    return f"{base}{slug}-{digest}"


def pod_name(workload_id: str) -> str:
    return f"cml-{workload_id}"


def parse_quota(text: str) -> dict[str, str]:
    """`requests.cpu=8,requests.memory=32Gi,pods=50` -> the ResourceQuota's hard limits."""
    hard: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{item!r} is not name=value")
        hard[name.strip()] = value.strip()
    return hard


def namespace_objects(name: str, site_id: str, quota: dict[str, str], appliance_cidrs: list[str],
                      appliance_namespace: str | None) -> dict[str, dict[str, Any]]:
    """The namespace and what comes with it: a quota, defaults for containers that ask for
    nothing, and a default-deny policy that admits only the appliance."""
    labels = {SITE_LABEL: site_id, MANAGED_LABEL: MANAGED_BY}
    peers: list[dict[str, Any]] = [{"ipBlock": {"cidr": cidr}} for cidr in appliance_cidrs]
    if appliance_namespace:
        peers.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": appliance_namespace}},
                      "podSelector": {"matchLabels": {APPLIANCE_POD_LABEL: APPLIANCE_POD_VALUE}}})
    return {
        "namespace": {"metadata": {"name": name, "labels": labels}},
        "quota": {"metadata": {"name": "cml-quota", "labels": labels}, "spec": {"hard": quota}},
        "limits": {"metadata": {"name": "cml-limits", "labels": labels}, "spec": {"limits": [{
            "type": "Container",
            "default": {"cpu": "1", "memory": "2Gi"},
            "defaultRequest": {"cpu": "250m", "memory": "256Mi"},
        }]}},
        "policy": {"metadata": {"name": "cml-default-deny", "labels": labels}, "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            # No peers: nothing may connect. Workloads never talk to each other.
            "ingress": [{"from": peers}] if peers else [],
        }},
    }


def _quantity_mb(memory_mb: int) -> str:
    return f"{memory_mb}Mi"


_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([a-zA-Z]*)$")


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity ("1500m", "8Gi", "24683784Ki", "2") as a number; 0 when unreadable."""
    match = _QUANTITY.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        return 0.0
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def pod_body(*, name: str, site_id: str, workload_id: str, kind: str, project_id: str, image: str,
             command: list[str], env: dict[str, str], cpu: float, memory_mb: int, gpus: int,
             grace_seconds: int, project_volume: dict[str, Any] | None, tls_secret: str | None,
             pull_secret: str | None, relay: tuple[list[str], int] | None,
             node_selector: dict[str, str] | None = None,
             readonly_host_paths: dict[str, str] | None = None) -> dict[str, Any]:
    """A workload's pod: non-root (uid 8536), no privilege escalation, no capabilities, no
    service account token, the resource profile as requests and limits. `readonly_host_paths`
    (where inside → the node's folder) are mounted read-only: runtime add-ons."""
    resources: dict[str, Any] = {
        "requests": {"cpu": f"{int(cpu * 1000)}m", "memory": _quantity_mb(memory_mb)},
        "limits": {"cpu": f"{int(cpu * 1000)}m", "memory": _quantity_mb(memory_mb)},
    }
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(gpus)
    locked_down = {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": False,
                   "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True, "runAsUser": CDSW_UID,
                   "runAsGroup": CDSW_UID}
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if project_volume is not None:
        volume = dict(project_volume)
        sub_path = volume.pop("subPath", None)
        volumes.append({"name": "project", **volume})
        mounts.append({"name": "project", "mountPath": CONTAINER_HOME} | ({"subPath": sub_path} if sub_path else {}))
    if tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret, "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
    for index, (inside, host_path) in enumerate(sorted((readonly_host_paths or {}).items())):
        volumes.append({"name": f"readonly-{index}", "hostPath": {"path": host_path, "type": "Directory"}})
        mounts.append({"name": f"readonly-{index}", "mountPath": inside, "readOnly": True})
    main = {
        "name": MAIN_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent", "command": command,
        "env": [{"name": k, "value": v} for k, v in env.items()], "workingDir": CONTAINER_HOME,
        "resources": resources, "securityContext": locked_down, "volumeMounts": mounts,
        "stdin": False, "tty": False,
    }
    containers = [main]
    if relay is not None:
        # The relay listens on the pod's address and forwards to the workload's 127.0.0.1:port,
        # where CML tells applications and models to serve (CDSW_APP_PORT).
        relay_command, _ = relay
        containers.append({
            "name": RELAY_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent", "command": relay_command,
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
            "securityContext": locked_down,
        })
    labels = {SITE_LABEL: site_id, WORKLOAD_LABEL: workload_id, KIND_LABEL: kind.replace("_", "-"),
              PROJECT_LABEL: project_id, MANAGED_LABEL: MANAGED_BY}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": CDSW_UID, "runAsGroup": CDSW_UID, "fsGroup": CDSW_UID},
        "containers": containers,
        "volumes": volumes,
    }
    if pull_secret:
        spec["imagePullSecrets"] = [{"name": pull_secret}]
    if node_selector:  # an accelerator's nodes (quotas/accelerators.py)
        spec["nodeSelector"] = dict(node_selector)
    return {"metadata": {"name": name, "labels": labels}, "spec": spec}


def service_body(name: str, site_id: str, workload_id: str, port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {SITE_LABEL: site_id, WORKLOAD_LABEL: workload_id,
                                              MANAGED_LABEL: MANAGED_BY}},
        "spec": {"selector": {WORKLOAD_LABEL: workload_id, SITE_LABEL: site_id},
                 "ports": [{"name": "http", "port": port, "targetPort": port}]},
    }


# Reading pods -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Observed:
    """A pod as CML would describe its workload."""

    workload_id: str
    status: str
    reason: str = ""
    node: str = ""
    exit_code: int | None = None
    # The pod object is gone from the cluster (deleted by hand, evicted and removed, a stop).
    gone: bool = False

    @property
    def final(self) -> bool:
        return self.status in states.FINISHED


def _get(obj: Any, *path: str) -> Any:
    """Pods arrive as dicts (raw watch) or as kubernetes-asyncio models; read both alike."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(key)
        else:
            obj = getattr(obj, _snake(key), None)
    return obj


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _main_state(pod: Any) -> tuple[dict[str, Any] | None, str]:
    """The main container's state as {"waiting"|"running"|"terminated": {...}} and its image."""
    for status in _get(pod, "status", "containerStatuses") or []:
        if _get(status, "name") == MAIN_CONTAINER:
            state = _get(status, "state")
            out = {}
            for key in ("waiting", "running", "terminated"):
                part = _get(state, key)
                if part is not None:
                    out[key] = {k: _get(part, k) for k in ("reason", "message", "exitCode", "signal")}
            return out, str(_get(status, "image") or "")
    return None, ""


def describe_pod(pod: Any, *, deleted: bool = False) -> Observed | None:
    """The workload status a pod means, with a reason in words; None for pods that are not ours."""
    labels = _get(pod, "metadata", "labels") or {}
    workload_id = labels.get(WORKLOAD_LABEL)
    if not workload_id:
        return None
    node = str(_get(pod, "spec", "nodeName") or "")
    image = next((str(_get(c, "image")) for c in _get(pod, "spec", "containers") or []
                  if _get(c, "name") == MAIN_CONTAINER), "")
    phase = _get(pod, "status", "phase") or "Pending"
    pod_reason, pod_message = _get(pod, "status", "reason"), _get(pod, "status", "message")
    main, _ = _main_state(pod)
    terminated = (main or {}).get("terminated")
    deleting = bool(_get(pod, "metadata", "deletionTimestamp"))
    if terminated is not None and deleting:
        # Ended because its pod was deleted (a stop of ours reads as the stop it was: the
        # workload is STOPPING then, and its stop status wins).
        code = terminated.get("exitCode")
        return Observed(workload_id, states.FAILED, "its pod was deleted (by hand, or by the cluster)", node,
                        int(code) if code is not None else None, gone=deleted)
    if terminated is not None:
        code = terminated.get("exitCode")
        code = int(code) if code is not None else None
        why = terminated.get("reason") or ""
        if why == "OOMKilled":
            reason = f"killed for using more memory than its limit (OOMKilled, exit code {code})"
        elif code == 0:
            reason = ""
        else:
            reason = f"the main process exited with code {code}" + (f" ({why})" if why and why not in ("Error", "Completed") else "")
        status = states.SUCCEEDED if code == 0 else states.FAILED
        return Observed(workload_id, status, reason, node, code, gone=deleted)
    if pod_reason == "Evicted" or (phase == "Failed" and pod_reason):
        message = f": {pod_message}" if pod_message else ""
        what = "evicted by the node" if pod_reason == "Evicted" else f"failed ({pod_reason})"
        return Observed(workload_id, states.FAILED, f"{what}{message}", node, gone=deleted)
    if deleted:
        return Observed(workload_id, states.FAILED, "its pod was deleted (by hand, or by the cluster)", node, gone=True)
    if phase == "Succeeded":
        return Observed(workload_id, states.SUCCEEDED, "", node, 0)
    if phase == "Failed":
        return Observed(workload_id, states.FAILED, f"the pod failed{': ' + pod_message if pod_message else ''}", node)
    waiting = (main or {}).get("waiting")
    if waiting is not None:
        why, message = waiting.get("reason") or "", waiting.get("message") or ""
        if why in IMAGE_FAILURES:
            return Observed(workload_id, states.FAILED,
                            f"the image {image} cannot be pulled ({why}){': ' + message if message else ''}", node)
        if why in CONFIG_FAILURES:
            return Observed(workload_id, states.FAILED, f"the container could not be created ({why}): {message}", node)
    if (main or {}).get("running") is not None:
        return Observed(workload_id, states.RUNNING, "", node)
    if not node:
        for condition in _get(pod, "status", "conditions") or []:
            if _get(condition, "type") == "PodScheduled" and _get(condition, "status") == "False":
                message = _get(condition, "message") or _get(condition, "reason") or "no node can take it"
                return Observed(workload_id, states.SCHEDULING, f"waiting for a node: {message}")
        return Observed(workload_id, states.SCHEDULING, "waiting to be scheduled")
    why = ((main or {}).get("waiting") or {}).get("reason") or "ContainerCreating"
    return Observed(workload_id, states.STARTING, f"starting on {node} ({why})", node)
