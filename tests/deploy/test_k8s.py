"""k8s/, checked offline: `kubectl kustomize` renders every overlay,
`kubernetes-validate --strict` accepts the cpu and gpu output (the
monitoring component's Prometheus Operator CRs are only rendered), and the
rendered objects are held to the image's service table and settings (no
drift), to the pod hardening every pod needs, and to the paths the network
policies allow. Envoy's mounted bootstrap and the edge listener the control
plane renders from these settings pass `envoy --mode validate`."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest
import yaml

from deploy_checks import (
    ROOT,
    check_settings,
    expected_bootstrap,
    regenerate_hint,
    run,
    tool,
    validate_edge_listener,
    validate_envoy_text,
)
from llmfabric.cli.container import ENVOY_OPS_PORT, SERVICES

OVERLAYS = ("cpu", "gpu")
VALIDATE = pathlib.Path(sys.executable).parent / "kubernetes-validate"


def render(overlay: str) -> list[dict]:
    kubectl = tool("kubectl", "it comes with the machine (kubectl kustomize renders offline)")
    res = run([kubectl, "kustomize", f"k8s/overlays/{overlay}"])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_strict_schema_validation(rendered, tmp_path: pathlib.Path) -> None:
    overlay, docs = rendered
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    res = run([str(VALIDATE), "--strict", "--quiet", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path: pathlib.Path) -> None:
    """The validator above can fail: a misspelt field is an error."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {prots: []}\n")
    assert run([str(VALIDATE), "--strict", "--quiet", str(bad)]).returncode != 0


def test_monitoring_component_renders() -> None:
    kinds = {d["kind"] for d in render("monitoring")}
    assert "PodMonitor" in kinds or "ServiceMonitor" in kinds


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs: list[dict]) -> list[dict]:
    return by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")


def ours(pod: dict) -> list[dict]:
    return [c for c in pod["containers"] if c["image"].split(":")[0].endswith("llmfabric")]


def env_of(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then env (fieldRefs as sample values)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]])
    samples = {"status.hostIP": "10.0.0.1", "status.podIP": "10.1.0.1", "metadata.name": "worker-abc"}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), ""), item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = samples[item["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = maps[ref["name"]][ref["key"]]
    return env


def test_every_llmfabric_container_matches_the_image(rendered) -> None:
    overlay, docs = rendered
    seen = set()
    for wl in workloads(docs):
        for c in ours(wl["spec"]["template"]["spec"]):
            (command,) = c["args"]
            seen.add(command)
            where = f"{overlay}: {wl['metadata']['name']}/{c['name']}"
            env = env_of(c, docs)
            check_settings(command, env, where)
            ports = {p["containerPort"] for p in c.get("ports", [])}
            if command == "envoy":
                assert ENVOY_OPS_PORT in ports and 8080 in ports, where
                continue
            svc = SERVICES[command]
            assert {svc.grpc_port, svc.metrics_port} <= ports, where
            if svc.http_port:
                assert svc.http_port in ports, where
            assert env[svc.prefix + "CONSUL"] == "http://10.0.0.1:8500", f"{where}: the node's Consul agent"
            assert env[svc.prefix + "ADVERTISE"] == "10.1.0.1", f"{where}: registers its pod IP"
            if command == "xds":
                validate_edge_listener(env, where)
    assert seen == {*SERVICES, "envoy"}


def drain_of(container: dict, docs: list[dict]) -> float:
    env = env_of(container, docs)
    drains = [float(v) for k, v in env.items() if k.endswith("_DRAIN_SECONDS")]
    return max(drains or [20.0])  # 20 s: ServerSettings' default


def test_every_pod_is_hardened_probed_and_bounded(rendered) -> None:
    overlay, docs = rendered
    for wl in workloads(docs):
        pod = wl["spec"]["template"]["spec"]
        name = f"{overlay}: {wl['kind']} {wl['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        containers = pod["containers"] + [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
        for c in containers:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            assert c.get("readinessProbe") and c.get("livenessProbe"), where
        for c in ours(pod):
            where = f"{name}/{c['name']}"
            if c["args"] == ["envoy"]:
                assert c["readinessProbe"]["httpGet"]["port"] in (ENVOY_OPS_PORT, "ops"), where
            else:
                port = SERVICES[c["args"][0]].grpc_port
                assert c["readinessProbe"]["grpc"] == {"port": port}, where
                assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}, where
            assert pod["terminationGracePeriodSeconds"] > drain_of(c, docs), f"{where}: grace <= drain"


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against pod labels."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def test_multi_replica_components_have_disruption_budgets_and_autoscalers(rendered) -> None:
    overlay, docs = rendered
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler")}
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for wl in workloads(docs):
        name = wl["metadata"]["name"]
        replicas = hpas[name]["spec"]["minReplicas"] if name in hpas else wl["spec"].get("replicas", 1)
        labels = wl["spec"]["template"]["metadata"]["labels"]
        if replicas > 1:
            assert any(selects(p["spec"]["selector"], labels) for p in pdbs), f"{overlay}: {name} has no PDB"
    for stateless in ("tokenizer", "frontend", "envoy"):
        metrics = hpas[stateless]["spec"]["metrics"]
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics), stateless
    worker = [m for m in hpas["worker"]["spec"]["metrics"] if m["type"] in ("External", "Object")]
    assert worker and worker[0][worker[0]["type"].lower()]["metric"]["name"] == "llmfabric_scheduler_queue_depth"
    assert '"llmfabric_scheduler_queue_depth"' in (ROOT / "services/scheduler/metrics.py").read_text()


def test_services_are_headless_except_the_edge(rendered) -> None:
    overlay, docs = rendered
    for svc in by_kind(docs, "Service"):
        name = svc["metadata"]["name"]
        if name == "envoy":
            assert svc["spec"].get("clusterIP") != "None"
            assert {p["port"] for p in svc["spec"]["ports"]} == {8080}, "only the edge listener is public"
        else:
            assert svc["spec"]["clusterIP"] == "None", f"{overlay}: {name} should be headless"


def test_network_policies_deny_by_default_and_open_only_the_design_paths(rendered) -> None:
    overlay, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, f"{overlay}: no default-deny policy"

    def ingress_sources(component: str, port: int) -> set[str]:
        """Components (by app.kubernetes.io/name) allowed in on ``port``; '*' = anyone."""
        out = set()
        for p in policies:
            if not selects(p["spec"]["podSelector"], {"app.kubernetes.io/name": component,
                                                      "app.kubernetes.io/component": component}):
                continue
            for rule in p["spec"].get("ingress", []):
                ports = {q.get("port") for q in rule.get("ports", [])}
                if ports and port not in ports and not ports & {"grpc", "http", "edge", "metrics", "ops"}:
                    continue
                if not rule.get("from"):
                    out.add("*")
                for peer in rule.get("from", []):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    if "namespaceSelector" in peer:
                        out.add("ns:" + str(peer["namespaceSelector"].get("matchLabels", {})))
                    elif labels:
                        out.add(labels.get("app.kubernetes.io/name") or labels.get("app.kubernetes.io/component", ""))
        return out

    assert "*" in ingress_sources("envoy", 8080)
    assert "envoy" in ingress_sources("frontend", 50051)
    for backend in ("tokenizer", "semcache", "scheduler"):
        assert "frontend" in ingress_sources(backend, 50051), backend
        assert "envoy" not in ingress_sources(backend, 50051), backend
    assert "scheduler" in ingress_sources("worker", 50051)
    assert "frontend" not in ingress_sources("worker", 50051)
    assert "envoy" in ingress_sources("xds", 18000)
    for component in ("tokenizer", "semcache", "worker", "scheduler", "frontend", "envoy", "xds"):
        assert "*" not in ingress_sources(component, 9464) or component == "envoy"


def test_envoy_bootstrap_configmap_is_the_rendered_one_and_valid(rendered) -> None:
    overlay, docs = rendered
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("envoy-bootstrap")]
    text = cm["data"]["bootstrap.yaml"]
    assert text == expected_bootstrap(), regenerate_hint("k8s/base/envoy/bootstrap.yaml")
    validate_envoy_text(text, "bootstrap.yaml")


def test_gpu_overlay_puts_engines_on_gpu_nodes() -> None:
    docs = render("gpu")
    engines = set()
    for wl in by_kind(docs, "Deployment"):
        pod = wl["spec"]["template"]["spec"]
        for c in ours(pod):
            if c["args"] == ["worker"]:
                engines.add(env_of(c, docs)["LLMFABRIC_WORKER_ENGINE"])
        sidecars = [c for c in pod.get("initContainers", []) + pod["containers"] if c not in ours(pod)]
        gpus = [c for c in sidecars if c["resources"]["limits"].get("nvidia.com/gpu")]
        if gpus:
            assert pod.get("nodeSelector") and any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert engines == {"sglang", "triton"}


def test_consul_helm_values_run_an_agent_on_every_node() -> None:
    values = yaml.safe_load((ROOT / "k8s" / "consul" / "values.yaml").read_text())
    assert values["client"]["enabled"] is True  # pods register with the agent on their node (hostPort 8500)
    assert values["server"]["replicas"] >= 1


def test_triton_model_repository_matches_the_compose_one() -> None:
    """Two copies (kustomize reads files under its own root only): same model config, same model and context."""
    import json

    def config(path: pathlib.Path) -> list[str]:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]

    compose_repo = ROOT / "deploy" / "triton" / "model_repository" / "llmfabric_llm"
    k8s_repo = ROOT / "k8s" / "overlays" / "gpu" / "triton"
    assert config(compose_repo / "config.pbtxt") == config(k8s_repo / "config.pbtxt")
    a, b = (json.loads(p.read_text()) for p in (compose_repo / "1" / "model.json", k8s_repo / "model.json"))
    assert (a["model"], a["max_model_len"]) == (b["model"], b["max_model_len"])
