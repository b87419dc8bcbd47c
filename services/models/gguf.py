"""A GGUF model opened through llama.cpp's low-level API.

``GgufModel`` owns the ``llama_model`` handle and answers vocabulary
questions (tokenize, token pieces, end-of-generation ids, metadata). The
tokenizer service opens it ``vocab_only`` (no weights, milliseconds); the
embedded engine opens it with weights and creates contexts from it. Both use
the same tokenizer code, so their token ids are identical by construction.
"""

from __future__ import annotations

import ctypes
import logging
import pathlib
import threading

import llama_cpp

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """Initialise llama.cpp once per process, with its own logging silenced."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
            _backend_ready = True


@llama_cpp.llama_log_callback
def _silent_log(level, text, user_data):  # noqa: ARG001 - C callback signature
    """llama.cpp's own chatter is dropped (our JSON logs carry what matters)."""


class GgufModel:
    """An opened GGUF file."""

    def __init__(self, path: pathlib.Path, *, vocab_only: bool, use_mmap: bool = True) -> None:
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = vocab_only
        params.use_mmap = use_mmap
        params.n_gpu_layers = 0
        self.path = path
        self.handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.handle:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.handle)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.handle)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self.eog_ids = tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self._eog = frozenset(self.eog_ids)
        self._pieces: dict[int, bytes] = {}
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        # texts that parse_special=True would turn into control tokens ("<|im_start|>", ...)
        self.special_texts = frozenset(
            text
            for t in range(self.n_vocab)
            if llama_cpp.llama_vocab_get_attr(self.vocab, t) & special and (text := self.token_text(t))
        )

    def meta(self, key: str) -> str:
        """A GGUF metadata string ("" if absent)."""
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, size)
        if n < 0:
            return ""
        if n >= size:  # larger than the buffer: retry with the exact size
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str:
        return self.meta("tokenizer.chat_template")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text`` exactly as llama.cpp tokenizes it."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            out = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, cap, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as b"")."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        out = buf.raw[:n]
        self._pieces[token] = out
        return out

    def token_text(self, token: int) -> str:
        """A token's text including special tokens (for display)."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def close(self) -> None:
        if self.handle:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None
