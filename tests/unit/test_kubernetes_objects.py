"""The Kubernetes engine's rules on their own: namespace names, what a pod is allowed, and how a
pod's state reads in CML's words. The engine against a real cluster: tests/integration/test_kubernetes.py."""

from __future__ import annotations

import re

import pytest

from cml_appliance.engines.kubernetes import objects
from cml_appliance.workloads import states


def test_namespaces_are_dns_labels_and_never_shared() -> None:
    names = ["alice", "Alice", "john.doe", "john-doe", "JOHN_DOE", "x" * 80, "é", "-", "a" * 62 + "b", "a" * 62 + "c"]
    made = [objects.namespace_for("cml", n) for n in names]
    for ns in made:
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", ns) and len(ns) <= 63, ns
        assert ns.startswith("cml-user-")
    assert len(set(made)) == len(made), made  # collision-safe
    assert objects.namespace_for("cml", "alice") == "cml-user-alice"  # plain names stay readable
    assert objects.namespace_for("cml", "alice") == objects.namespace_for("cml", "alice")


def test_quota_setting_parses_and_refuses_garbage() -> None:
    assert objects.parse_quota("requests.cpu=8, pods=50") == {"requests.cpu": "8", "pods": "50"}
    assert objects.parse_quota("") == {}
    with pytest.raises(ValueError):
        objects.parse_quota("pods")


def _pod(**overrides):
    body = objects.pod_body(
        name="cml-w1", site_id="s1", workload_id="w1", kind="model_replica", project_id="p1", image="img:1",
        command=["sleep", "1"], env={"A": "b"}, cpu=1.5, memory_mb=512, gpus=overrides.pop("gpus", 0),
        grace_seconds=5, project_volume={"hostPath": {"path": "/data/p1", "type": "Directory"}},
        tls_secret="cml-w1-tls", pull_secret=overrides.pop("pull_secret", None), relay=(["python3", "-c", "x"], 8100))
    return body


def test_pods_are_locked_down() -> None:
    pod = _pod(gpus=2, pull_secret="cml-w1-pull")
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsUser"] == 8536 and spec["securityContext"]["runAsNonRoot"]
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
    main = spec["containers"][0]
    assert main["resources"]["limits"] == {"cpu": "1500m", "memory": "512Mi", "nvidia.com/gpu": "2"}
    assert main["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {m["mountPath"] for m in main["volumeMounts"]} == {"/home/cdsw", "/run/cml/tls"}
    assert spec["imagePullSecrets"] == [{"name": "cml-w1-pull"}]
    labels = pod["metadata"]["labels"]
    assert labels[objects.SITE_LABEL] == "s1" and labels[objects.WORKLOAD_LABEL] == "w1"
    assert labels[objects.PROJECT_LABEL] == "p1" and labels[objects.KIND_LABEL] == "model-replica"


def test_namespace_comes_with_quota_limits_and_default_deny() -> None:
    made = objects.namespace_objects("cml-user-a", "s1", {"pods": "5"}, [], None)
    assert made["quota"]["spec"]["hard"] == {"pods": "5"}
    policy = made["policy"]["spec"]
    assert policy["podSelector"] == {} and policy["policyTypes"] == ["Ingress"] and policy["ingress"] == []
    admitted = objects.namespace_objects("cml-user-a", "s1", {}, ["10.0.0.5/32"], "cml")["policy"]["spec"]["ingress"]
    peers = admitted[0]["from"]
    assert {"ipBlock": {"cidr": "10.0.0.5/32"}} in peers
    assert any("namespaceSelector" in p for p in peers)


def _status(phase="Pending", node="", main=None, conditions=None, reason=None, message=None):
    pod = {"metadata": {"name": "cml-w1", "namespace": "ns", "labels": {objects.WORKLOAD_LABEL: "w1"}},
           "spec": {"nodeName": node or None, "containers": [{"name": "main", "image": "reg/img:1"}]},
           "status": {"phase": phase, "conditions": conditions or [], "reason": reason, "message": message}}
    if main is not None:
        pod["status"]["containerStatuses"] = [{"name": "main", "image": "reg/img:1", "state": main}]
    return pod


def test_pod_states_read_in_cmls_words() -> None:
    unschedulable = objects.describe_pod(_status(conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient cpu."}]))
    assert unschedulable.status == states.SCHEDULING and "Insufficient cpu" in unschedulable.reason
    starting = objects.describe_pod(_status(node="n1", main={"waiting": {"reason": "ContainerCreating"}}))
    assert starting.status == states.STARTING and starting.node == "n1"
    pulling = objects.describe_pod(_status(node="n1", main={"waiting": {"reason": "ImagePullBackOff",
                                                                        "message": "Back-off pulling"}}))
    assert pulling.status == states.FAILED and "reg/img:1" in pulling.reason and pulling.final
    running = objects.describe_pod(_status("Running", "n1", {"running": {"startedAt": "x"}}))
    assert running.status == states.RUNNING and running.reason == ""
    oom = objects.describe_pod(_status("Failed", "n1", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))
    assert oom.status == states.FAILED and "OOMKilled" in oom.reason and oom.exit_code == 137
    done = objects.describe_pod(_status("Succeeded", "n1", {"terminated": {"exitCode": 0, "reason": "Completed"}}))
    assert done.status == states.SUCCEEDED and done.exit_code == 0
    exited = objects.describe_pod(_status("Failed", "n1", {"terminated": {"exitCode": 3, "reason": "Error"}}))
    assert exited.reason == "the main process exited with code 3"
    evicted = objects.describe_pod(_status("Failed", "n1", reason="Evicted", message="The node was low on memory."))
    assert evicted.status == states.FAILED and "evicted" in evicted.reason and "low on memory" in evicted.reason
    deleted = objects.describe_pod(_status("Running", "n1", {"running": {}}), deleted=True)
    assert deleted.status == states.FAILED and deleted.gone and "deleted" in deleted.reason
    terminating = _status("Running", "n1", {"terminated": {"exitCode": 0, "reason": "Completed"}})
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ended = objects.describe_pod(terminating)  # a clean exit on SIGTERM is still a deleted pod
    assert ended.status == states.FAILED and "deleted" in ended.reason and not ended.gone
    assert objects.describe_pod({"metadata": {"labels": {}}}) is None  # not ours


def _engine(projects_volume: str = ""):
    from pathlib import Path

    from kubernetes_asyncio import client

    from cml_appliance.engines.kubernetes.engine import KubernetesEngine, KubernetesSettings

    settings = KubernetesSettings(kubeconfig="x", projects_volume=projects_volume)
    return KubernetesEngine("s1", settings, client.Configuration(), projects_dir=Path("/data/projects"), stop_grace=3)


def _spec(project_dir: str, mount: bool = True):
    from pathlib import Path

    from cml_appliance.engines.base import LaunchSpec

    return LaunchSpec(workload_id="w1", kind="session", command=[], env={}, project_dir=Path(project_dir),
                      image="i", cpu=1, memory_mb=512, mount_project=mount, owner="alice")


async def test_project_files_come_from_a_claim_or_the_nodes_disk() -> None:
    engine = _engine("shared-projects")
    assert engine._project_volume(_spec("/data/projects/p1")) == {
        "persistentVolumeClaim": {"claimName": "shared-projects"}, "subPath": "p1"}
    assert _engine("/mnt/cml/projects")._project_volume(_spec("/data/projects/p1")) == {
        "hostPath": {"path": "/mnt/cml/projects/p1", "type": "Directory"}}
    assert _engine()._project_volume(_spec("/data/projects/p1"))["hostPath"]["path"] == "/data/projects/p1"
    assert _engine()._project_volume(_spec("/data/projects/p1", mount=False)) is None  # a built image's own


async def test_addons_are_read_only_host_paths_only_where_the_node_sees_the_appliances_disk() -> None:
    import dataclasses
    from pathlib import Path

    from cml_appliance.engines.base import EngineError

    pod = objects.pod_body(
        name="cml-w1", site_id="s1", workload_id="w1", kind="session", project_id="p1", image="img:1",
        command=["sleep", "1"], env={}, cpu=1, memory_mb=512, gpus=0, grace_seconds=5, project_volume=None,
        tls_secret=None, pull_secret=None, relay=None,
        readonly_host_paths={"/runtime-addons/tools": "/data/runtime-addons/3"})
    assert pod["spec"]["volumes"] == [{"name": "readonly-0", "hostPath": {"path": "/data/runtime-addons/3", "type": "Directory"}}]
    assert pod["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "readonly-0", "mountPath": "/runtime-addons/tools", "readOnly": True}]
    spec = dataclasses.replace(_spec("/data/projects/p1"), readonly_mounts={"/runtime-addons/tools": Path("/data/runtime-addons/3")})
    with pytest.raises(EngineError, match="sees the appliance's disk"):
        await _engine("shared-projects")._start_in("cml-alice", spec)  # refused before any call to the cluster


async def test_transient_apiserver_errors_are_retried_and_409_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes_asyncio.client.rest import ApiException

    from cml_appliance.engines.kubernetes import engine as kube

    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr(kube.asyncio, "sleep", no_sleep)
    answers = [ApiException(status=503), ApiException(status=500), "made"]

    async def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await kube.with_retries(flaky, "test") == "made"

    async def exists() -> None:
        raise ApiException(status=409)

    await kube.create_idempotent(exists, "test")  # no error: it is there already

    async def forbidden() -> None:
        raise ApiException(status=403)

    with pytest.raises(ApiException):
        await kube.create_idempotent(forbidden, "test")
