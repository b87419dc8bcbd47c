"""Engine that fronts a Triton server's decoupled LLM model over gRPC streaming.

Relied on, as read in triton-inference-server/vllm_backend (src/model.py, src/utils/request.py,
docs/additional_outputs.md) and tritonclient.grpc: inputs ``text_input`` BYTES [1] (the prompt text),
``stream`` BOOL, ``sampling_parameters`` BYTES (JSON: max_tokens, temperature, top_p, top_k with -1 = off, seed,
stop, repetition_penalty), ``exclude_input_in_output`` BOOL, ``return_finish_reason`` /
``return_num_input_tokens`` / ``return_num_output_tokens`` BOOL (r24.12+); outputs ``text_output`` (the delta
since the previous response when streaming), ``finish_reason`` ("None" until the end, then "stop", "length" or
"abort"), ``num_input_tokens``, ``num_output_tokens`` (tokens since the previous response). The model is
decoupled, so requests go over ``ModelStreamInfer``: one client and one stream per request, so that cancelling
a request is ``stop_stream(cancel_requests=True)`` (Triton then reports the request cancelled to the model;
the vLLM backend aborts it, ``llmfabric.tritonserve`` stops its engine). With ``enable_empty_final_response``
the last response carries the ``triton_final_response`` parameter (with or without data). tritonclient calls
the stream callback on its own thread, by keyword (``result=``, ``error=``). ``is_server_ready`` /
``is_model_ready`` answer readiness. Triton has no prefix-cache flush API, so ``flush_cache`` returns 0.

The prompt travels as text: the token ids are rendered back with special tokens as text (``<|im_start|>``), and
the server's tokenizer (the same model's, ``parse_special``) turns them into the same ids.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import json
import logging
import time
from collections.abc import AsyncIterator

import llama_cpp
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from llmfabric.models.catalog import default_model
from llmfabric.models.gguf import GgufModel
from llmfabric.runtime.errors import DeadlineExceeded, FabricError, InvalidArgument, Unavailable
from llmfabric.structs import Finish, Sampling, TokenChunk, Usage, ValidatedRequest

from .config import WorkerConfig
from .engine import EngineInfo, EngineKind, EngineLoad

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0  # seconds per readiness call
_FINISH = {"stop": Finish.STOP, "length": Finish.LENGTH, "abort": Finish.CANCELLED}
_FLAGS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")


def _message(exc: BaseException) -> str:
    """Triton's message, condensed (PyTriton sends a whole traceback: its last line says it)."""
    text = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    lines = [ln.strip() for ln in (text or type(exc).__name__).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(exc).__name__


def _classify(exc: BaseException, where: str) -> FabricError:
    status = exc.status() if isinstance(exc, InferenceServerException) else None
    msg = f"{where}: {_message(exc)}"
    if status == "StatusCode.INVALID_ARGUMENT" or (status is None and _message(exc).startswith("ValueError")):
        return InvalidArgument("", msg)
    return DeadlineExceeded(msg) if status == "StatusCode.DEADLINE_EXCEEDED" else Unavailable(msg)


def _sampling_json(s: Sampling) -> str:
    params = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
              "top_k": s.top_k if s.top_k > 0 else -1, "stop": list(s.stop), "repetition_penalty": s.repetition_penalty}
    return json.dumps(params if s.seed is None else {**params, "seed": s.seed})


def _input(name: str, value: object) -> grpcclient.InferInput:
    bytes_ = isinstance(value, bytes)
    tensor = grpcclient.InferInput(name, [1], "BYTES" if bytes_ else "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if bytes_ else np.bool_))
    return tensor


def _output(result: grpcclient.InferResult, name: str) -> np.ndarray | None:
    return result.as_numpy(name) if result.get_output(name) is not None else None


def _close(client: grpcclient.InferenceServerClient, cancel: bool) -> None:
    try:
        client.stop_stream(cancel_requests=cancel)
        client.close()
    except Exception as exc:  # noqa: BLE001 - closing is best effort
        log.debug("closing a Triton stream failed: %r", exc)


class TritonEngine:
    """The Engine protocol over one Triton model with the vLLM backend's tensor names."""

    def __init__(self, cfg: WorkerConfig, *, startup_timeout: float | None = None) -> None:
        self.cfg = cfg
        self.startup_timeout = cfg.startup_timeout if startup_timeout is None else startup_timeout
        self.spec = default_model(cfg.model_name or None)  # the GGUF whose vocabulary renders prompts
        self.info = EngineInfo(EngineKind.TRITON, self.spec.name, cfg.context_length, cfg.capacity)
        self._vocab: GgufModel | None = None
        self._pieces: dict[int, bytes] = {}
        self._inflight = 0
        self._prompt_total = 0
        self._closing: set[asyncio.Future] = set()  # stream shutdowns running in threads

    async def start(self) -> None:
        self._vocab = await asyncio.to_thread(GgufModel, self.spec.path, vocab_only=True)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        log.info("Triton model ready", extra={"url": self.cfg.triton_url, "triton_model": self.cfg.triton_model})

    async def _wait_ready(self) -> None:
        deadline, last = time.monotonic() + self.startup_timeout, "no answer"
        while time.monotonic() < deadline:
            last = await asyncio.to_thread(self._probe)
            if not last:
                return
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        raise Unavailable(f"Triton at {self.cfg.triton_url} did not have model {self.cfg.triton_model!r} ready "
                          f"within {self.startup_timeout:g}s (last: {last})")

    def _probe(self) -> str:
        """"" when the server and the model are ready, else what is not."""
        client = grpcclient.InferenceServerClient(self.cfg.triton_url)
        try:
            if not client.is_server_ready(client_timeout=PROBE_TIMEOUT):
                return "server not ready"
            if client.is_model_ready(self.cfg.triton_model, client_timeout=PROBE_TIMEOUT):
                return ""
            client.get_model_metadata(self.cfg.triton_model, client_timeout=PROBE_TIMEOUT)
            return "model not ready"
        except InferenceServerException as exc:
            return _message(exc)
        finally:
            client.close()

    async def stop(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    def _render(self, ids: tuple[int, ...]) -> str:
        """The prompt as text, special tokens included (bytes joined first: a character may span tokens)."""
        out = bytearray()
        for t in ids:
            piece = self._pieces.get(t)
            if piece is None:
                buf = ctypes.create_string_buffer(256)
                n = llama_cpp.llama_token_to_piece(self._vocab.vocab, t, buf, 256, 0, True)
                if n < 0:
                    buf = ctypes.create_string_buffer(-n)
                    n = llama_cpp.llama_token_to_piece(self._vocab.vocab, t, buf, -n, 0, True)
                piece = self._pieces[t] = buf.raw[: max(n, 0)]
            out += piece
        return out.decode("utf-8", errors="replace")

    async def generate(self, request: ValidatedRequest) -> AsyncIterator[TokenChunk]:
        if self._vocab is None:
            raise Unavailable("Triton engine is not started")
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self._vocab.n_vocab]
        if bad:
            raise InvalidArgument("request.prompt_token_ids",
                                  f"ids outside the vocabulary 0..{self._vocab.n_vocab - 1}: {bad[:5]}")
        loop = asyncio.get_running_loop()
        responses: asyncio.Queue = asyncio.Queue()

        def callback(result=None, error=None) -> None:  # tritonclient's thread, called by keyword
            try:
                loop.call_soon_threadsafe(responses.put_nowait, (result, error))
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        inputs = [_input("text_input", self._render(request.prompt_token_ids).encode("utf-8")),
                  _input("stream", True), _input("sampling_parameters", _sampling_json(request.sampling).encode()),
                  _input("exclude_input_in_output", True), *(_input(flag, True) for flag in _FLAGS)]
        timeout = self.cfg.request_timeout
        deadline = loop.time() + timeout
        client = grpcclient.InferenceServerClient(self.cfg.triton_url)
        self._inflight += 1
        self._prompt_total += len(request.prompt_token_ids)
        finished, streamed = False, False
        try:
            client.start_stream(callback=callback, stream_timeout=timeout)
            try:
                client.async_stream_infer(self.cfg.triton_model, inputs, request_id=request.request_id,
                                          enable_empty_final_response=True)
            except InferenceServerException as exc:  # the stream already failed: its callback has the reason
                try:
                    _, error = await asyncio.wait_for(responses.get(), 1.0)
                except asyncio.TimeoutError:
                    error = None
                where = f"Triton at {self.cfg.triton_url} failed before the first token"
                raise _classify(error or exc, where) from None
            text = codecs.getincrementaldecoder("utf-8")(errors="replace")
            finish, n_in, n_out, deltas = None, None, None, 0
            while True:
                try:
                    result, error = await asyncio.wait_for(responses.get(), max(deadline - loop.time(), 0.0))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"Triton did not finish within {timeout:g}s") from None
                if error is not None:
                    where = "mid-stream" if streamed else "before the first token"
                    raise _classify(error, f"Triton at {self.cfg.triton_url} failed {where}")
                out = _output(result, "text_output")
                delta = text.decode(b"".join(bytes(x) for x in out.reshape(-1))) if out is not None else ""
                reason = _output(result, "finish_reason")
                reason = bytes(reason.reshape(-1)[0]).decode() if reason is not None and reason.size else "None"
                if reason != "None":
                    if reason not in _FINISH:
                        raise Unavailable(f"Triton finished with an unknown finish_reason {reason!r}")
                    finish = _FINISH[reason]
                count = _output(result, "num_input_tokens")
                n_in = int(count.reshape(-1)[0]) if count is not None and count.size else n_in
                count = _output(result, "num_output_tokens")
                n_out = (n_out or 0) + int(count.sum()) if count is not None else n_out
                deltas += bool(delta)
                param = result.get_response().parameters.get("triton_final_response")
                if param is not None and param.bool_param:
                    break
                if delta:
                    streamed = True
                    yield TokenChunk(token_ids=(), text=delta)
            finished = True
            if n_in is not None and n_in != len(request.prompt_token_ids):
                log.warning("Triton counted %d prompt tokens, the request had %d", n_in,
                            len(request.prompt_token_ids), extra={"request": request.request_id})
            usage = Usage(prompt_tokens=n_in if n_in is not None else len(request.prompt_token_ids),
                          completion_tokens=n_out if n_out is not None else deltas)
            yield TokenChunk(token_ids=(), text=delta + text.decode(b"", final=True),
                             finish=finish or Finish.STOP, usage=usage)
        finally:
            self._inflight -= 1
            try:  # off the loop: stopping a stream joins tritonclient's response thread
                closing = loop.run_in_executor(None, _close, client, not finished)
            except RuntimeError:  # the loop is shutting down
                _close(client, not finished)
            else:
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    def load(self) -> EngineLoad:
        n, cap = self._inflight, self.info.capacity
        # Triton's own queue and KV cache are not visible through the vLLM-backend protocol
        return EngineLoad(running=min(n, cap), waiting=max(n - cap, 0), capacity=cap, kv_used=0, kv_free=0,
                          prompt_tokens_total=self._prompt_total, cached_tokens_total=0, evictions_total=0)

    async def flush_cache(self) -> int:
        return 0  # Triton has no API to drop an LLM backend's prefix cache
