"""runtime.config: environment parsing, CLI overrides, errors that name the
variable or flag, validate() hooks, and the real service configs."""

from __future__ import annotations

import dataclasses

import pytest

from llmfabric.frontend.config import FrontendConfig
from llmfabric.runtime.config import ConfigError, ServerSettings, env_name, load_config, setting
from llmfabric.runtime.startup import config_or_exit
from llmfabric.scheduler.config import SchedulerConfig
from llmfabric.tokenizer.config import TokenizerConfig
from llmfabric.worker.config import WorkerConfig

P = "T_"


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """Every supported type, one required field, a validate() hook."""

    name: str = setting(help="required name")
    count: int = setting(3, help="an int")
    ratio: float = setting(0.5, help="a float")
    enabled: bool = setting(False, help="a bool")
    tags: tuple[str, ...] = setting((), help="comma separated")
    label: str = setting("dflt", help="a str with a default")

    def validate(self) -> None:
        if self.count < 0:
            raise ConfigError(f"{P}COUNT={self.count}: must not be negative")


@dataclasses.dataclass(frozen=True, slots=True)
class NoValidate:
    value: int = setting(1, help="an int")


def load(argv=(), **env):
    return load_config(Sample, P, list(argv), environ=env)


# ---------------------------------------------------------------- parsing


def test_defaults_and_required_from_env():
    cfg = load(T_NAME="svc")
    assert cfg == Sample(name="svc", count=3, ratio=0.5, enabled=False, tags=(), label="dflt")


def test_str_kept_verbatim():
    assert load(T_NAME="  spaced  value ").name == "  spaced  value "


def test_empty_string_is_a_valid_str():
    assert load(T_NAME="").name == ""


@pytest.mark.parametrize("raw,expected", [("7", 7), (" 42 ", 42), ("-3", -3), ("0", 0), ("1_000", 1000)])
def test_int_parsing(raw, expected):
    if expected < 0:  # validate() rejects negatives; test the parser through a field without a hook
        assert load_config(NoValidate, P, [], environ={"T_VALUE": raw}).value == expected
    else:
        assert load(T_NAME="x", T_COUNT=raw).count == expected


@pytest.mark.parametrize("raw,expected", [("1.25", 1.25), ("3", 3.0), ("-0.5", -0.5), ("1e-3", 0.001)])
def test_float_parsing(raw, expected):
    cfg = load(T_NAME="x", T_RATIO=raw)
    assert cfg.ratio == pytest.approx(expected)
    assert isinstance(cfg.ratio, float)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "Yes", "on", " true "])
def test_bool_true_spellings(raw):
    assert load(T_NAME="x", T_ENABLED=raw).enabled is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "NO", "off", ""])
def test_bool_false_spellings(raw):
    assert load(T_NAME="x", T_ENABLED=raw).enabled is False


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("a,b,c", ("a", "b", "c")),
        (" a , b ,c ", ("a", "b", "c")),
        ("a,,b,", ("a", "b")),
        ("", ()),
        ("single", ("single",)),
        ("host:1,host:2", ("host:1", "host:2")),
    ],
)
def test_tuple_parsing(raw, expected):
    assert load(T_NAME="x", T_TAGS=raw).tags == expected


def test_unrelated_env_vars_ignored():
    cfg = load(T_NAME="x", OTHER_COUNT="nonsense", T_COUNTS="nonsense", t_count="nonsense")
    assert cfg.count == 3


def test_env_name_helper():
    assert env_name("LLMFABRIC_WORKER_", "metrics_port") == "LLMFABRIC_WORKER_METRICS_PORT"


# ------------------------------------------------------------ CLI overrides


def test_flag_overrides_env():
    cfg = load(["--count", "9", "--name", "from-flag"], T_NAME="from-env", T_COUNT="1")
    assert (cfg.name, cfg.count) == ("from-flag", 9)


def test_flag_with_equals_and_dashes():
    cfg = load(["--name=n", "--enabled=yes", "--tags=x,y", "--label", "L"])
    assert (cfg.name, cfg.enabled, cfg.tags, cfg.label) == ("n", True, ("x", "y"), "L")


def test_flag_satisfies_required_field():
    assert load(["--name", "only-flag"]).name == "only-flag"


def test_env_used_where_no_flag():
    cfg = load(["--count", "5"], T_NAME="n", T_RATIO="2.5")
    assert (cfg.count, cfg.ratio) == (5, 2.5)


def test_argv_none_does_not_read_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--bogus-flag"])
    assert load_config(Sample, P, None, environ={"T_NAME": "x"}).name == "x"


def test_environ_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("T_NAME", "from-os")
    monkeypatch.setenv("T_COUNT", "11")
    cfg = load_config(Sample, P, [])
    assert (cfg.name, cfg.count) == ("from-os", 11)


def test_unknown_flag_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        load(["--no-such-flag", "1"], T_NAME="x")
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_help_text_names_env_var(capsys):
    with pytest.raises(SystemExit) as exc:
        load(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--count" in out and "T_COUNT" in out and "an int" in out


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "var,raw,typename",
    [
        ("T_COUNT", "seven", "int"),
        ("T_COUNT", "1.5", "int"),
        ("T_COUNT", "", "int"),
        ("T_RATIO", "half", "float"),
        ("T_RATIO", "", "float"),
        ("T_ENABLED", "maybe", "bool"),
        ("T_ENABLED", "ture", "bool"),
    ],
)
def test_malformed_env_value_names_variable(var, raw, typename):
    with pytest.raises(ConfigError) as exc:
        load(T_NAME="x", **{var: raw})
    msg = str(exc.value)
    assert msg.startswith(f"{var}=")
    assert repr(raw) in msg
    assert typename in msg


@pytest.mark.parametrize(
    "flag,raw",
    [("--count", "many"), ("--ratio", "x"), ("--enabled", "perhaps")],
)
def test_malformed_flag_names_flag(flag, raw):
    with pytest.raises(ConfigError) as exc:
        load([flag, raw], T_NAME="x")
    msg = str(exc.value)
    assert msg.startswith(f"{flag}=")
    assert repr(raw) in msg


def test_malformed_flag_reported_even_if_env_is_fine():
    with pytest.raises(ConfigError, match="--count="):
        load(["--count", "bad"], T_NAME="x", T_COUNT="4")


def test_malformed_env_ignored_when_flag_overrides():
    # The flag wins, so the bad environment value is never parsed.
    assert load(["--count", "4"], T_NAME="x", T_COUNT="bad").count == 4


def test_missing_required_names_variable_and_help():
    with pytest.raises(ConfigError) as exc:
        load()
    assert "T_NAME is required" in str(exc.value)
    assert "required name" in str(exc.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_hook_runs_after_parsing():
    with pytest.raises(ConfigError, match="T_COUNT=-1"):
        load(T_NAME="x", T_COUNT="-1")


def test_validate_hook_runs_on_flag_values_too():
    with pytest.raises(ConfigError, match="must not be negative"):
        load(["--count", "-2"], T_NAME="x")


def test_class_without_validate():
    assert load_config(NoValidate, P, [], environ={}).value == 1


def test_result_is_frozen():
    cfg = load(T_NAME="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.count = 5  # type: ignore[misc]


# ------------------------------------------------------- ServerSettings


def test_server_settings_defaults():
    s = load_config(ServerSettings, "S_", [], environ={})
    assert s == ServerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_seconds=20.0, log_level="info")


def test_server_settings_from_env_and_flags():
    s = load_config(
        ServerSettings, "S_", ["--drain-seconds", "1.5"], environ={"S_PORT": "5000", "S_METRICS_PORT": "-1"}
    )
    assert (s.port, s.metrics_port, s.drain_seconds) == (5000, -1, 1.5)


# ------------------------------------------------------- real services


WORKER = "LLMFABRIC_WORKER_"
SCHED = "LLMFABRIC_SCHEDULER_"
FRONT = "LLMFABRIC_FRONTEND_"
TOK = "LLMFABRIC_TOKENIZER_"


def test_worker_defaults():
    cfg = load_config(WorkerConfig, WORKER, [], environ={})
    assert cfg.engine == "embedded"
    assert cfg.context_length == 2048
    assert cfg.port == 0  # inherited ServerSettings field


def test_worker_env_and_flag():
    cfg = load_config(
        WorkerConfig,
        WORKER,
        ["--capacity", "8", "--worker-id", "w-flag"],
        environ={"LLMFABRIC_WORKER_PORT": "7001", "LLMFABRIC_WORKER_CAPACITY": "2", "LLMFABRIC_WORKER_N_BATCH": "64"},
    )
    assert (cfg.port, cfg.capacity, cfg.worker_id, cfg.n_batch) == (7001, 8, "w-flag", 64)


def test_worker_ignores_other_service_prefix():
    cfg = load_config(WorkerConfig, WORKER, [], environ={"LLMFABRIC_SCHEDULER_PORT": "9"})
    assert cfg.port == 0


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"LLMFABRIC_WORKER_ENGINE": "vllm"}, "LLMFABRIC_WORKER_ENGINE='vllm'"),
        ({"LLMFABRIC_WORKER_CONTEXT_LENGTH": "8"}, "LLMFABRIC_WORKER_CONTEXT_LENGTH=8"),
        ({"LLMFABRIC_WORKER_CAPACITY": "0"}, "LLMFABRIC_WORKER_CAPACITY=0"),
        ({"LLMFABRIC_WORKER_MAX_WAITING": "-1"}, "LLMFABRIC_WORKER_MAX_WAITING=-1"),
        ({"LLMFABRIC_WORKER_N_BATCH": "16"}, "LLMFABRIC_WORKER_N_BATCH=16"),
        ({"LLMFABRIC_WORKER_CAPACITY": "four"}, "LLMFABRIC_WORKER_CAPACITY='four'"),
        ({"LLMFABRIC_WORKER_DRAIN_SECONDS": "soon"}, "LLMFABRIC_WORKER_DRAIN_SECONDS='soon'"),
    ],
)
def test_worker_rejections_name_variable(env, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(WorkerConfig, WORKER, [], environ=env)
    assert needle in str(exc.value)


def test_scheduler_workers_tuple():
    cfg = load_config(SchedulerConfig, SCHED, [], environ={"LLMFABRIC_SCHEDULER_WORKERS": "a:1, b:2"})
    assert cfg.workers == ("a:1", "b:2")
    assert cfg.routing == "cache_aware"


def test_scheduler_workers_flag_overrides_env():
    cfg = load_config(
        SchedulerConfig, SCHED, ["--workers", "c:3"], environ={"LLMFABRIC_SCHEDULER_WORKERS": "a:1,b:2"}
    )
    assert cfg.workers == ("c:3",)


@pytest.mark.parametrize("raw", [None, "", " , "])
def test_scheduler_requires_workers(raw):
    env = {} if raw is None else {"LLMFABRIC_SCHEDULER_WORKERS": raw}
    with pytest.raises(ConfigError, match="LLMFABRIC_SCHEDULER_WORKERS"):
        load_config(SchedulerConfig, SCHED, [], environ=env)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"LLMFABRIC_SCHEDULER_ROUTING": "random"}, "LLMFABRIC_SCHEDULER_ROUTING='random'"),
        ({"LLMFABRIC_SCHEDULER_MAX_WAITING": "0"}, "LLMFABRIC_SCHEDULER_MAX_WAITING=0"),
        ({"LLMFABRIC_SCHEDULER_PROBE_INTERVAL": "0"}, "LLMFABRIC_SCHEDULER_PROBE_INTERVAL="),
        ({"LLMFABRIC_SCHEDULER_PROBE_INTERVAL": "-1"}, "LLMFABRIC_SCHEDULER_PROBE_INTERVAL="),
        ({"LLMFABRIC_SCHEDULER_MAX_RETRIES": "x"}, "LLMFABRIC_SCHEDULER_MAX_RETRIES='x'"),
    ],
)
def test_scheduler_rejections_name_variable(extra, needle):
    env = {"LLMFABRIC_SCHEDULER_WORKERS": "a:1", **extra}
    with pytest.raises(ConfigError) as exc:
        load_config(SchedulerConfig, SCHED, [], environ=env)
    assert needle in str(exc.value)


@pytest.mark.parametrize("raw", ["nan", "inf"])
def test_scheduler_probe_interval_must_be_finite(raw):
    env = {"LLMFABRIC_SCHEDULER_WORKERS": "a:1", "LLMFABRIC_SCHEDULER_PROBE_INTERVAL": raw}
    with pytest.raises(ConfigError, match="LLMFABRIC_SCHEDULER_PROBE_INTERVAL"):
        load_config(SchedulerConfig, SCHED, [], environ=env)


def test_frontend_requires_tokenizer_and_scheduler():
    with pytest.raises(ConfigError, match="LLMFABRIC_FRONTEND_TOKENIZER is required"):
        load_config(FrontendConfig, FRONT, [], environ={"LLMFABRIC_FRONTEND_SCHEDULER": "h:1"})
    with pytest.raises(ConfigError, match="LLMFABRIC_FRONTEND_SCHEDULER is required"):
        load_config(FrontendConfig, FRONT, [], environ={"LLMFABRIC_FRONTEND_TOKENIZER": "h:1"})


def test_frontend_ok():
    cfg = load_config(
        FrontendConfig,
        FRONT,
        ["--http-port", "8080"],
        environ={"LLMFABRIC_FRONTEND_TOKENIZER": "127.0.0.1:5001", "LLMFABRIC_FRONTEND_SCHEDULER": "sched:5002"},
    )
    assert (cfg.http_port, cfg.tokenizer, cfg.scheduler) == (8080, "127.0.0.1:5001", "sched:5002")


@pytest.mark.parametrize("bad", ["localhost", ":5001", "host:", "host:port", "host:50a1"])
def test_frontend_rejects_bad_address(bad):
    env = {"LLMFABRIC_FRONTEND_TOKENIZER": bad, "LLMFABRIC_FRONTEND_SCHEDULER": "h:1"}
    with pytest.raises(ConfigError) as exc:
        load_config(FrontendConfig, FRONT, [], environ=env)
    assert f"LLMFABRIC_FRONTEND_TOKENIZER={bad!r}" in str(exc.value)
    assert "host:port" in str(exc.value)


def test_tokenizer_defaults_and_overrides():
    cfg = load_config(TokenizerConfig, TOK, ["--default-max-tokens", "32"], environ={"LLMFABRIC_TOKENIZER_CONTEXT_LENGTH": "64"})
    assert (cfg.context_length, cfg.default_max_tokens, cfg.max_request_bytes) == (64, 32, 1 << 20)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"LLMFABRIC_TOKENIZER_CONTEXT_LENGTH": "15"}, "LLMFABRIC_TOKENIZER_CONTEXT_LENGTH=15"),
        ({"LLMFABRIC_TOKENIZER_MAX_REQUEST_BYTES": "0"}, "LLMFABRIC_TOKENIZER_MAX_REQUEST_BYTES=0"),
        ({"LLMFABRIC_TOKENIZER_DEFAULT_MAX_TOKENS": "0"}, "LLMFABRIC_TOKENIZER_DEFAULT_MAX_TOKENS=0"),
        (
            {"LLMFABRIC_TOKENIZER_CONTEXT_LENGTH": "100", "LLMFABRIC_TOKENIZER_DEFAULT_MAX_TOKENS": "101"},
            "LLMFABRIC_TOKENIZER_DEFAULT_MAX_TOKENS=101",
        ),
        ({"LLMFABRIC_TOKENIZER_CONTEXT_LENGTH": "2k"}, "LLMFABRIC_TOKENIZER_CONTEXT_LENGTH='2k'"),
    ],
)
def test_tokenizer_rejections_name_variable(env, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(TokenizerConfig, TOK, [], environ=env)
    assert needle in str(exc.value)


# ------------------------------------------------------- config_or_exit


def _clear(monkeypatch, prefix):
    import os

    for key in list(os.environ):
        if key.startswith(prefix):
            monkeypatch.delenv(key)


def test_config_or_exit_returns_config(monkeypatch):
    _clear(monkeypatch, TOK)
    monkeypatch.setenv("LLMFABRIC_TOKENIZER_PORT", "6001")
    cfg = config_or_exit(TokenizerConfig, TOK, ["--log-level", "debug"])
    assert (cfg.port, cfg.log_level) == (6001, "debug")


def test_config_or_exit_malformed_env(monkeypatch, capsys):
    _clear(monkeypatch, WORKER)
    monkeypatch.setenv("LLMFABRIC_WORKER_PORT", "eighty")
    with pytest.raises(SystemExit) as exc:
        config_or_exit(WorkerConfig, WORKER, [])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("configuration error: ")
    assert "LLMFABRIC_WORKER_PORT='eighty'" in lines[0]


def test_config_or_exit_missing_required(monkeypatch, capsys):
    _clear(monkeypatch, FRONT)
    monkeypatch.setenv("LLMFABRIC_FRONTEND_SCHEDULER", "h:1")
    with pytest.raises(SystemExit) as exc:
        config_or_exit(FrontendConfig, FRONT, [])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "LLMFABRIC_FRONTEND_TOKENIZER is required" in lines[0]


def test_config_or_exit_bad_flag_value(monkeypatch, capsys):
    _clear(monkeypatch, SCHED)
    with pytest.raises(SystemExit) as exc:
        config_or_exit(SchedulerConfig, SCHED, ["--workers", "a:1", "--max-waiting", "lots"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "--max-waiting='lots'" in lines[0]


def test_config_or_exit_validate_failure(monkeypatch, capsys):
    _clear(monkeypatch, SCHED)
    with pytest.raises(SystemExit) as exc:
        config_or_exit(SchedulerConfig, SCHED, [])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "LLMFABRIC_SCHEDULER_WORKERS" in err
