"""API keys: parsing, files, local generation; errors never show a whole key."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest
from llmfabric.gateway import apikeys
from llmfabric.gateway.apikeys import ApiKey

KEY_A = "lf-aaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-BBBB.bbbb_bbbb~bbbb+bb/b=="
KEY_C = "cccccccccccccccc"  # exactly 16


def test_parse_pairs() -> None:
    keys = apikeys.parse_api_keys(f" {KEY_A}:acme , {KEY_B}:beta.team-1,,{KEY_C}:acme,")
    assert [(k.key, k.tenant) for k in keys] == [
        (KEY_A, "acme"),
        (KEY_B, "beta.team-1"),
        (KEY_C, "acme"),
    ]
    assert apikeys.parse_api_keys("") == ()
    assert apikeys.parse_api_keys(" , ") == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"{KEY_A}:acme,{KEY_B}", r"entry 2: expected key:tenant"),
        ("short:acme", r"entry 1: key …\(5 chars\) must be 16-256"),
        (f"{KEY_A}x{'y' * 300}:acme", "must be 16-256"),
        ("lf-has space inside-xx:acme", "may only hold"),
        ("lf-colon:inside-the-key:acme", "may only hold"),
        (f"{KEY_A}:", "tenant ''"),
        (f"{KEY_A}:bad tenant", "tenant 'bad tenant'"),
        (f"{KEY_A}:-leading", "starting with a letter or digit"),
        (f"{KEY_A}:a=b", "tenant 'a=b'"),
        (f"{KEY_A}:{'t' * 65}", "1-64"),
        (
            f"{KEY_A}:acme,{KEY_A}:beta",
            r"entry 2: key lf-a…\(27 chars\) repeats LLMFABRIC_API_KEYS entry 1",
        ),
    ],
)
def test_parse_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        apikeys.parse_api_keys(text)
    assert KEY_A not in str(err.value)
    assert "lf-colon:inside" not in str(err.value)
    assert "lf-has space" not in str(err.value)


def test_api_key_repr_hides_the_key() -> None:
    key = ApiKey(KEY_A, "acme")
    assert KEY_A not in repr(key) and "acme" in repr(key)
    assert key.hint == "lf-a…(27 chars)"
    with pytest.raises(ValueError, match="key must be a string"):
        ApiKey(None, "acme")  # type: ignore[arg-type]


def test_load_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        f"# llmfabric keys\n\n{KEY_A}:acme   # the main key\n  {KEY_B}:beta\n"
    )
    keys = apikeys.load_api_keys_file(path)
    assert [(k.key, k.tenant) for k in keys] == [(KEY_A, "acme"), (KEY_B, "beta")]


def test_load_file_errors_name_the_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# keys\n{KEY_A}:acme\n{KEY_B}:no such tenant\n")
    with pytest.raises(ValueError, match=rf"{path}:3: tenant 'no such tenant'") as err:
        apikeys.load_api_keys_file(path)
    assert KEY_B not in str(err.value)
    path.write_text(f"{KEY_A}:acme\n{KEY_A}:acme\n")
    with pytest.raises(
        ValueError, match=rf"{path}:2: key lf-a…\(27 chars\) repeats {path}:1"
    ):
        apikeys.load_api_keys_file(path)


def test_load_from_environment(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_B}:beta\n")
    env = {apikeys.ENV_KEYS: f"{KEY_A}:acme", apikeys.ENV_KEYS_FILE: str(path)}
    assert [k.tenant for k in apikeys.load_api_keys(env)] == ["acme", "beta"]
    assert apikeys.load_api_keys({}) == ()
    with pytest.raises(ValueError, match="LLMFABRIC_API_KEYS_FILE: cannot read"):
        apikeys.load_api_keys({apikeys.ENV_KEYS_FILE: str(tmp_path / "missing")})
    path.write_text(f"{KEY_A}:other\n")
    with pytest.raises(ValueError, match="repeats") as err:
        apikeys.load_api_keys(env)
    assert KEY_A not in str(err.value)


def test_generate() -> None:
    keys = {apikeys.generate_api_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("lf-") and len(key) == 46
        ApiKey(key, "t")  # valid by the same rules as configured keys


def test_ensure_local_keys_creates_then_reuses(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state" / "llmfabric" / "api_keys"
    (first,) = apikeys.ensure_local_keys(path)
    assert first.tenant == "local" and first.key.startswith("lf-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert apikeys.ensure_local_keys(path) == (first,)  # the same key on the next run
    assert apikeys.ensure_local_keys(str(path), tenant="ignored-once-made") == (first,)


def test_ensure_local_keys_refuses_readable_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "api_keys"
    apikeys.ensure_local_keys(path, tenant="dev")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        apikeys.ensure_local_keys(path)


def test_ensure_local_keys_refuses_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "api_keys"
    path.write_text("# nothing\n")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="no key:tenant"):
        apikeys.ensure_local_keys(path)


def test_ensure_local_keys_stays_out_of_git(tmp_path: pathlib.Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    path = tmp_path / "repo" / "config" / "api_keys"
    with pytest.raises(ValueError, match="git work tree"):
        apikeys.ensure_local_keys(path)
    assert not path.exists()


def test_ensure_local_keys_validates_tenant(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="tenant"):
        apikeys.ensure_local_keys(tmp_path / "k", tenant="no spaces")
    assert not (tmp_path / "k").exists()
