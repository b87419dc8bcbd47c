"""Snapshots of the answer store: written whole to a temporary file, flushed
to disk and renamed over the previous snapshot, so a crash at any moment
leaves either the old or the new file — never a torn one — and loses at most
what changed since the last snapshot.

Format: ``LLMFSC01`` then one record per entry (least recently used first,
so reloading restores the LRU order): ``u32 length, u32 crc32, body``. The
body packs the entry's fields (see ``_pack``). Loading stops at the first
record that is short or fails its CRC (a damaged disk, not our writer) and
keeps what came before; expired entries are skipped.
"""

from __future__ import annotations

import logging
import os
import pathlib
import struct
import zlib
from collections.abc import Iterator

import numpy as np

from .store import Entry

log = logging.getLogger(__name__)

MAGIC = b"LLMFSC01"
_HEAD = struct.Struct("<II")  # length, crc32
_FIXED = struct.Struct("<qdd32s32sHHIII")  # id, created, expires, namespace, exact, len(model), len(tenant), len(query), dim, len(payload)


def _pack(e: Entry) -> bytes:
    model, tenant, query = e.model.encode(), e.tenant.encode(), e.query.encode()
    fixed = _FIXED.pack(e.id, e.created, e.expires, e.namespace, e.exact, len(model), len(tenant), len(query),
                        e.vector.shape[0], len(e.payload))
    return b"".join((fixed, model, tenant, query, e.vector.astype("<f4").tobytes(), e.payload))


def _unpack(body: bytes) -> Entry:
    eid, created, expires, ns, exact, lm, lt, lq, dim, lp = _FIXED.unpack_from(body)
    off = _FIXED.size
    parts = []
    for n in (lm, lt, lq):
        parts.append(body[off : off + n].decode())
        off += n
    vector = np.frombuffer(body, dtype="<f4", count=dim, offset=off).astype(np.float32)
    off += 4 * dim
    payload = body[off : off + lp]
    if len(payload) != lp:
        raise ValueError("record shorter than its fields")
    return Entry(eid, ns, exact, parts[2], parts[0], parts[1], vector, payload, created, expires)


def save(entries: list[Entry], path: pathlib.Path) -> int:
    """Write a snapshot atomically; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            for e in entries:
                body = _pack(e)
                f.write(_HEAD.pack(len(body), zlib.crc32(body)))
                f.write(body)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def load(path: pathlib.Path, now: float) -> Iterator[Entry]:
    """Entries of a snapshot that have not expired, oldest use first; nothing if there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data.startswith(MAGIC):
        log.warning("semantic cache snapshot has an unknown format; starting empty", extra={"path": str(path)})
        return
    off, n, bad = len(MAGIC), 0, False
    while off < len(data):
        if off + _HEAD.size > len(data):
            bad = True
            break
        length, crc = _HEAD.unpack_from(data, off)
        body = data[off + _HEAD.size : off + _HEAD.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            bad = True
            break
        off += _HEAD.size + length
        try:
            e = _unpack(body)
        except (ValueError, UnicodeDecodeError, struct.error):
            bad = True
            break
        n += 1
        if e.expires > now:
            yield e
    if bad:
        log.warning("semantic cache snapshot is damaged after %d entries; keeping those", n, extra={"path": str(path)})
