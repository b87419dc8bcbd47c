"""SchedulerConfig validation and StaticDiscovery."""

from __future__ import annotations

import pytest

from llmfabric.runtime.config import ConfigError, load_config
from llmfabric.scheduler.config import PREFIX, SchedulerConfig
from llmfabric.scheduler.discovery import Endpoint, StaticDiscovery

GOOD = {"LLMFABRIC_SCHEDULER_WORKERS": "127.0.0.1:50061,127.0.0.1:50062"}


def _load(env: dict[str, str], argv: list[str] | None = None) -> SchedulerConfig:
    return load_config(SchedulerConfig, PREFIX, argv or [], environ=env)


def test_workers_from_environment():
    cfg = _load(GOOD)
    assert cfg.workers == ("127.0.0.1:50061", "127.0.0.1:50062")
    assert cfg.routing == "cache_aware"
    assert cfg.max_waiting >= 1 and cfg.probe_interval > 0


def test_flags_override_environment():
    cfg = _load(GOOD, ["--workers", "h:1", "--routing", "round_robin", "--max-waiting", "3", "--probe-interval", "0.5"])
    assert cfg.workers == ("h:1",)
    assert cfg.routing == "round_robin"
    assert cfg.max_waiting == 3
    assert cfg.probe_interval == 0.5


def test_workers_list_tolerates_spaces_and_empty_items():
    cfg = _load({"LLMFABRIC_SCHEDULER_WORKERS": " h:1 , ,h:2,"})
    assert cfg.workers == ("h:1", "h:2")


@pytest.mark.parametrize("env", [{}, {"LLMFABRIC_SCHEDULER_WORKERS": ""}, {"LLMFABRIC_SCHEDULER_WORKERS": " , "}])
def test_missing_workers_names_the_variable(env):
    with pytest.raises(ConfigError, match="LLMFABRIC_SCHEDULER_WORKERS"):
        _load(env)


def test_bad_routing_names_the_variable_and_the_choices():
    with pytest.raises(ConfigError) as exc_info:
        _load({**GOOD, "LLMFABRIC_SCHEDULER_ROUTING": "random"})
    msg = str(exc_info.value)
    assert "LLMFABRIC_SCHEDULER_ROUTING" in msg
    assert "round_robin" in msg and "least_load" in msg


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_waiting_must_be_positive(value):
    with pytest.raises(ConfigError, match="LLMFABRIC_SCHEDULER_MAX_WAITING"):
        _load({**GOOD, "LLMFABRIC_SCHEDULER_MAX_WAITING": value})


@pytest.mark.parametrize("value", ["0", "-1"])
def test_probe_interval_must_be_positive(value):
    with pytest.raises(ConfigError, match="LLMFABRIC_SCHEDULER_PROBE_INTERVAL"):
        _load({**GOOD, "LLMFABRIC_SCHEDULER_PROBE_INTERVAL": value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_WAITING", "many"), ("PROBE_INTERVAL", "fast"), ("MAX_RETRIES", "1.5"), ("PORT", "http")],
)
def test_malformed_numbers_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=f"LLMFABRIC_SCHEDULER_{name}"):
        _load({**GOOD, f"LLMFABRIC_SCHEDULER_{name}": value})


def test_validate_directly():
    SchedulerConfig(workers=("h:1",)).validate()
    with pytest.raises(ConfigError):
        SchedulerConfig().validate()
    with pytest.raises(ConfigError):
        SchedulerConfig(workers=("h:1",), routing="cache_aware_typo").validate()


def test_malformed_worker_address_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="LLMFABRIC_SCHEDULER_WORKERS"):
        _load({"LLMFABRIC_SCHEDULER_WORKERS": "127.0.0.1:50061,nohost"})


# ------------------------------------------------------------------ discovery


def test_static_discovery_lists_endpoints():
    d = StaticDiscovery(["127.0.0.1:50061", "localhost:7", "[::1]:9000"])
    assert d.endpoints() == [Endpoint("127.0.0.1:50061"), Endpoint("localhost:7"), Endpoint("[::1]:9000")]
    eps = d.endpoints()
    eps.clear()  # a copy: callers cannot change the set
    assert len(d.endpoints()) == 3


def test_static_discovery_subscribe_never_calls_back():
    calls = []
    d = StaticDiscovery(("h:1",))
    d.subscribe(calls.append)
    assert calls == []


def test_static_discovery_empty_is_allowed():
    assert StaticDiscovery(()).endpoints() == []


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1", ":50051", "host:", "host:port", "host:-1", "", "host:5 0"])
def test_static_discovery_rejects_bad_addresses(bad):
    with pytest.raises(ValueError, match="host:port"):
        StaticDiscovery(["127.0.0.1:50061", bad])


async def test_scheduler_service_rejects_a_bad_worker_address():
    from llmfabric.scheduler.server import SchedulerService

    with pytest.raises(ValueError, match="not host:port"):
        SchedulerService(SchedulerConfig(workers=("nohost",), metrics_port=-1))
