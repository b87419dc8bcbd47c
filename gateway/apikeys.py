"""API keys for the edge: each key maps to one tenant.

Three sources, one format (``key:tenant``):

* ``LLMFABRIC_API_KEYS`` — comma-separated pairs (dev, compose);
* a file named by ``LLMFABRIC_API_KEYS_FILE`` — one pair per line, ``#``
  comments and blank lines ignored (a Kubernetes Secret mounted as a file);
* :func:`ensure_local_keys` — a key made up on first run and kept in a 0600
  file outside the repository (``llmfabric up`` on a laptop).

Rules, checked everywhere:

* a key is 16–256 characters of the RFC 7235 ``token68`` alphabet
  (``A-Z a-z 0-9 - . _ ~ + /`` then optional ``=`` padding): exactly what may
  follow ``Authorization: Bearer``, and free of ``,`` ``:`` ``#`` and
  whitespace so the formats above stay unambiguous. 16 characters is a floor
  against typos and toy keys, not a strength guarantee: generated keys carry
  256 random bits (:func:`generate_api_key`);
* a tenant id is 1–64 characters of ``A-Z a-z 0-9 . _ -`` starting with a
  letter or digit. It travels as the ``x-tenant-id`` header, names rate-limit
  buckets and cache namespaces, and appears in ``tenant=value`` lists of the
  scheduler's settings, so ``,`` ``=`` ``:`` and spaces are out;
* a key appears once (one key, one tenant); a tenant may have many keys.

Errors name the entry (position or file line) and show a key only as its
length and, for keys of 16+ characters, its first four characters.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import secrets
from collections.abc import Iterable, Mapping

__all__ = [
    "ENV_KEYS",
    "ENV_KEYS_FILE",
    "KEY_PREFIX",
    "ApiKey",
    "ensure_local_keys",
    "generate_api_key",
    "load_api_keys",
    "load_api_keys_file",
    "local_keys_path",
    "mask",
    "parse_api_keys",
    "validate_tenant",
]

ENV_KEYS = "LLMFABRIC_API_KEYS"  # "key:tenant,key:tenant"
ENV_KEYS_FILE = "LLMFABRIC_API_KEYS_FILE"  # path of a file with one key:tenant a line
KEY_PREFIX = "lf-"  # generated keys start with this (easy to spot in a leak scanner)

_KEY_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_MIN, _KEY_MAX = 16, 256


def mask(key: str) -> str:
    """A key fit for a message: its length, and its first four characters if it is
    long enough (>= 16) for them to give little away."""
    if len(key) >= _KEY_MIN:
        return f"{key[:4]}…({len(key)} chars)"
    return f"…({len(key)} chars)"


def validate_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid tenant id; ValueError naming the rule otherwise."""
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return tenant


def _validate_key(key: str) -> None:
    if not isinstance(key, str):
        raise ValueError("key must be a string")  # noqa: TRY004
    if not _KEY_MIN <= len(key) <= _KEY_MAX:
        raise ValueError(
            f"key {mask(key)} must be {_KEY_MIN}-{_KEY_MAX} characters long"
        )
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"key {mask(key)} may only hold A-Z a-z 0-9 - . _ ~ + / (then '=')"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """One credential the edge accepts and the tenant it stands for."""

    # The secret itself (never in repr or error messages).
    key: str = dataclasses.field(repr=False)
    # Tenant id forwarded upstream as x-tenant-id.
    tenant: str

    def __post_init__(self) -> None:
        _validate_key(self.key)
        validate_tenant(self.tenant)

    @property
    def hint(self) -> str:
        """A loggable stand-in for the key (see :func:`mask`)."""
        return mask(self.key)


def _pair(entry: str, where: str) -> ApiKey:
    key, sep, tenant = entry.strip().rpartition(":")
    if not sep:
        raise ValueError(
            f"{where}: expected key:tenant, got an entry of {len(entry)} chars"
        )
    try:
        return ApiKey(key.strip(), tenant.strip())
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _unique(keys: Iterable[tuple[ApiKey, str]]) -> tuple[ApiKey, ...]:
    seen: dict[str, str] = {}
    out = []
    for api_key, where in keys:
        if api_key.key in seen:
            raise ValueError(f"{where}: key {api_key.hint} repeats {seen[api_key.key]}")
        seen[api_key.key] = where
        out.append(api_key)
    return tuple(out)


def parse_api_keys(text: str, *, source: str = ENV_KEYS) -> tuple[ApiKey, ...]:
    """Keys from ``key:tenant,key:tenant`` (empty entries are skipped)."""
    entries = [(i, e) for i, e in enumerate(text.split(","), 1) if e.strip()]
    return _unique(
        (_pair(e, f"{source} entry {i}"), f"{source} entry {i}") for i, e in entries
    )


def load_api_keys_file(path: str | os.PathLike[str]) -> tuple[ApiKey, ...]:
    """Keys from a file with one ``key:tenant`` a line; ``#`` starts a comment."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    entries = [(n, line.split("#", 1)[0]) for n, line in enumerate(lines, 1)]
    return _unique(
        (_pair(e, f"{path}:{n}"), f"{path}:{n}") for n, e in entries if e.strip()
    )


def load_api_keys(environ: Mapping[str, str] = os.environ) -> tuple[ApiKey, ...]:
    """Keys from ``LLMFABRIC_API_KEYS`` and the file named by ``LLMFABRIC_API_KEYS_FILE``."""
    keys = [(k, f"{ENV_KEYS}") for k in parse_api_keys(environ.get(ENV_KEYS, ""))]
    if path := environ.get(ENV_KEYS_FILE, ""):
        try:
            keys += [(k, f"{path}") for k in load_api_keys_file(path)]
        except OSError as err:
            raise ValueError(
                f"{ENV_KEYS_FILE}: cannot read {path}: {err.strerror}"
            ) from None
    return _unique(keys)


def local_keys_path() -> pathlib.Path:
    """Where ``llmfabric up`` keeps its local key: ``$XDG_CONFIG_HOME/llmfabric/api-keys``
    (default ``~/.config``), outside any repository."""
    base = os.environ.get("XDG_CONFIG_HOME") or pathlib.Path.home() / ".config"
    return pathlib.Path(base) / "llmfabric" / "api-keys"


def generate_api_key() -> str:
    """A new key: ``lf-`` and 256 random bits, URL-safe base64 (46 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _in_git_worktree(path: pathlib.Path) -> pathlib.Path | None:
    for parent in path.parents:
        if (parent / ".git").exists():
            return parent
    return None


def ensure_local_keys(
    path: str | os.PathLike[str], tenant: str = "local"
) -> tuple[ApiKey, ...]:
    """The keys in ``path``, creating it with one fresh key for ``tenant`` on first run.

    The file is created with mode 0600 (its directory 0700 when made here) and
    exclusively, so two concurrent first runs cannot both write it. An existing
    file that group or others may read is refused, like ssh does, and so is a
    path inside a git work tree: keys must not end up in a commit.
    """
    file = pathlib.Path(path).expanduser().absolute()
    validate_tenant(tenant)
    if repo := _in_git_worktree(file):
        raise ValueError(
            f"{file}: inside the git work tree {repo}; keep API keys outside it"
        )
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = file.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(
                f"{file}: mode {mode:o} lets others read API keys; chmod 600"
            ) from None
        keys = load_api_keys_file(file)
        if not keys:
            raise ValueError(f"{file}: holds no key:tenant line") from None
        return keys
    key = ApiKey(generate_api_key(), tenant)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(
            f"# llmfabric API keys, one key:tenant a line\n{key.key}:{key.tenant}\n"
        )
    return (key,)
