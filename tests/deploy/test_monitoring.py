"""The observability files: every metric the Grafana dashboard queries exists
(llmfabric_* in the code, envoy_* with our listener's stat prefix), the
dashboard's datasource is the provisioned one, and Prometheus discovers every
service of the image through Consul. (The relabelling itself is exercised
against running services in tests/integration/test_compose_stack.py.)"""

from __future__ import annotations

import json
import re

import yaml

from deploy_checks import ROOT
from llmfabric.cli.container import SERVICES

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "llmfabric.json"
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def code_metrics() -> set[str]:
    names = set()
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "gateway").rglob("*.py")]:
        names |= set(re.findall(r"[\"'](llmfabric_[a-z0-9_]+)[\"']", path.read_text()))
    return names


def exprs(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        out += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    return out


def base_name(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def test_dashboard_queries_only_metrics_the_code_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = code_metrics()
    queried = {base_name(n) for e in exprs(dashboard) for n in re.findall(r"\bllmfabric_[a-z0-9_]+", e)}
    assert queried, "the dashboard queries no llmfabric metric"
    assert queried <= known, sorted(queried - known)
    # what the issue asks the dashboard to show
    for must in ("llmfabric_scheduler_queue_depth", "llmfabric_worker_time_to_first_token_seconds",
                 "llmfabric_worker_inter_token_seconds", "llmfabric_worker_generated_tokens",
                 "llmfabric_semcache_lookups", "llmfabric_scheduler_worker_in_flight", "llmfabric_rpc_requests"):
        assert must in queried, must


def test_dashboard_envoy_queries_use_the_edge_listener_prefix() -> None:
    listener = (ROOT / "gateway" / "envoy" / "listener.yaml.j2").read_text()
    prefix = re.search(r"^\s*stat_prefix: (\w+)$", listener, re.M).group(1)
    for e in exprs(json.loads(DASHBOARD.read_text())):
        for value in re.findall(r'envoy_http_conn_manager_prefix="([^"]+)"', e):
            assert value == prefix, e


def test_dashboard_uses_the_provisioned_datasource() -> None:
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if "datasource" in panel:
            assert panel["datasource"]["uid"] in uids, panel["title"]
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/llmfabric.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_prometheus_discovers_every_service_through_consul() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j.get("consul_sd_configs")]
    assert set(job["consul_sd_configs"][0]["services"]) == set(SERVICES)
    assert job["consul_sd_configs"][0]["server"] == "consul:8500"
