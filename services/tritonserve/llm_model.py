"""The decoupled LLM model: the embedded engine under the tensor names of
Triton's vLLM backend, as a PyTriton inference callable.

Followed as read in triton-inference-server/vllm_backend (src/model.py
``_auto_complete_inputs_and_outputs``, ``_infer``; src/utils/request.py
``GenerateRequest``; src/utils/vllm_backend_utils.py ``TritonSamplingParams``;
docs/additional_outputs.md):

inputs  ``text_input`` BYTES [1]; optional ``stream`` BOOL [1] (default false),
        ``sampling_parameters`` BYTES [1] (a JSON object; without it the request
        parameters are used; ``null`` values mean "default"),
        ``exclude_input_in_output`` BOOL [1] (absent: true when streaming, else
        false; streaming with it false is an error), ``return_finish_reason``,
        ``return_cumulative_logprob``, ``return_logprobs``,
        ``return_num_input_tokens``, ``return_num_output_tokens`` BOOL [1]
        (additional outputs, off unless set; logprobs are not available here
        and asking for them is an error).
outputs ``text_output`` BYTES [-1]: with ``stream`` one response per text
        delta, the last one carrying the final delta; without, one response
        with the whole answer (the prompt first unless excluded).
        ``finish_reason`` BYTES [-1]: vLLM's ``str(finish_reason)`` — "None"
        until the last response, then "stop", "length" or "abort".
        ``num_input_tokens`` UINT32 [1]: prompt tokens.
        ``num_output_tokens`` UINT32 [-1]: tokens generated since the previous
        response.
model   decoupled, no Triton batching (max_batch_size 0).

Sampling parameters (vLLM ``SamplingParams`` names and defaults):
temperature 1.0, top_p 1.0, top_k -1 (0 and -1 disable), max_tokens 16,
stop (a string or a list), seed, repetition_penalty 1.0. vLLM parameters this
engine does not implement are accepted only at their neutral value; unknown
ones are rejected, as vLLM's ``SamplingParams(**params)`` would.

``text_input`` is the already-templated prompt: it is tokenized with
``parse_special=True`` and no added BOS, so special tokens written as text
(``<|im_start|>``) become their ids again.

A request the client cancels is stopped in the engine (``stub_cancel.py``
carries Triton's cancellation here) and its stream simply ends; one still
running when the server stops ends with finish_reason "abort", as vLLM ends
an aborted request. Errors (bad input: ValueError naming the field) become
Triton error responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from pytriton.model_config import Tensor

from llmfabric.structs import Finish, Sampling, TokenChunk, ValidatedRequest

from .stub_cancel import MARKER_PARAM, REQUEST_ID_PARAM

log = logging.getLogger(__name__)

_FLAGS = ("return_finish_reason", "return_cumulative_logprob", "return_logprobs",
          "return_num_input_tokens", "return_num_output_tokens")
INPUTS = [
    Tensor(name="text_input", dtype=bytes, shape=(1,)),
    Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
    Tensor(name="sampling_parameters", dtype=bytes, shape=(1,), optional=True),
    Tensor(name="exclude_input_in_output", dtype=np.bool_, shape=(1,), optional=True),
    *(Tensor(name=flag, dtype=np.bool_, shape=(1,), optional=True) for flag in _FLAGS),
]
OUTPUTS = [
    Tensor(name="text_output", dtype=bytes, shape=(-1,)),
    Tensor(name="finish_reason", dtype=bytes, shape=(-1,)),
    Tensor(name="num_input_tokens", dtype=np.uint32, shape=(1,)),
    Tensor(name="num_output_tokens", dtype=np.uint32, shape=(-1,)),
]
# vLLM SamplingParams fields this engine has no use for, with the value that means "off"
_NEUTRAL: dict[str, Any] = {
    "n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "min_tokens": 0,
    "ignore_eos": False, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False, "detokenize": True, "stop_token_ids": [], "logprobs": None,
    "prompt_logprobs": None,
}
_FINISH = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.CANCELLED: "abort"}
CANCEL_POLL_SECONDS = 0.1


def sampling_from_json(raw: str) -> Sampling:
    """vLLM-style sampling parameters → Sampling (ValueError names the field)."""
    try:
        params = json.loads(raw or "{}")
    except ValueError as exc:
        raise ValueError(f"sampling_parameters: not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ValueError("sampling_parameters: must be a JSON object")
    params = {k: v for k, v in params.items() if v is not None}  # as the vLLM backend: None = default

    def num(key: str, default: float, kind: type = float) -> Any:
        value = params.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"sampling_parameters.{key}: expected a number, got {value!r}")
        try:
            out = kind(value)
        except ValueError:
            raise ValueError(f"sampling_parameters.{key}: expected a number, got {value!r}") from None
        if kind is int and out != float(value):
            raise ValueError(f"sampling_parameters.{key}: expected an integer, got {value!r}")
        return out

    temperature, top_p = num("temperature", 1.0), num("top_p", 1.0)
    top_k, max_tokens = num("top_k", -1, int), num("max_tokens", 16, int)
    penalty, seed = num("repetition_penalty", 1.0), params.pop("seed", None)
    stop = params.pop("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("sampling_parameters.stop: expected a string or a list of strings")
    checks = ((temperature >= 0, "temperature", "must be >= 0"), (0 < top_p <= 1, "top_p", "must be in (0, 1]"),
              (top_k >= -1, "top_k", "must be -1, 0 (disabled) or positive"),
              (max_tokens >= 1, "max_tokens", "must be at least 1"),
              (penalty > 0, "repetition_penalty", "must be > 0"))
    for ok, key, why in checks:
        if not ok:
            raise ValueError(f"sampling_parameters.{key}: {why}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"sampling_parameters.seed: expected an integer, got {seed!r}")
    for key, value in params.items():
        if key not in _NEUTRAL:
            raise ValueError(f"sampling_parameters.{key}: unknown parameter")
        if value != _NEUTRAL[key] and not (value == [] and _NEUTRAL[key] is None):
            raise ValueError(f"sampling_parameters.{key}={value!r}: not supported by this engine "
                             f"(only {_NEUTRAL[key]!r})")
    return Sampling(temperature=temperature, top_p=top_p, top_k=max(top_k, 0), max_tokens=max_tokens,
                    stop=tuple(stop), seed=seed, repetition_penalty=penalty)


def _flag(data: dict[str, np.ndarray], name: str) -> bool | None:
    value = data.get(name)
    return None if value is None or value.size == 0 else bool(value.reshape(-1)[0])


def _bytes(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


class LlmModel:
    """The inference callable: one request in, a stream of vLLM-shaped responses out."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine  # an EmbeddedEngine, started
        self.model_name = model_name
        self.cancelled_total = 0  # requests stopped because the client cancelled
        self.draining = False  # set when the server stops: new requests are refused
        self._aborts: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}  # in-flight requests

    @property
    def active(self) -> int:
        """Requests being generated."""
        return len(self._aborts)

    def abort_all(self) -> None:
        """End every in-flight request now with finish_reason "abort" (thread-safe)."""
        for loop, event in list(self._aborts.values()):
            loop.call_soon_threadsafe(event.set)

    async def __call__(self, requests) -> AsyncIterator[list[dict[str, np.ndarray]]]:
        if len(requests) != 1:  # batching is disabled: Triton hands over one request at a time
            raise ValueError(f"expected one request per call, got {len(requests)}")
        if self.draining:
            raise RuntimeError("the server is shutting down")
        request = requests[0]
        params = dict(request.parameters or {})
        marker, triton_id = params.pop(MARKER_PARAM, ""), str(params.pop(REQUEST_ID_PARAM, ""))
        async for response in self._generate(request.data, params, marker, triton_id):
            yield [response]

    def _parse(self, data: dict[str, np.ndarray], params: dict) -> tuple[ValidatedRequest, str, bool, bool, dict]:
        raw = data.get("text_input")
        if raw is None or raw.size != 1:
            raise ValueError("text_input: exactly one prompt string is required")
        value = raw.reshape(-1)[0]
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError as exc:
            raise ValueError(f"text_input: not UTF-8: {exc}") from None
        stream = bool(_flag(data, "stream"))
        exclude = _flag(data, "exclude_input_in_output")
        prepend = (not exclude) if exclude is not None else not stream
        if prepend and stream:
            raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
        wanted = {flag: bool(_flag(data, flag)) for flag in _FLAGS}
        if wanted["return_logprobs"] or wanted["return_cumulative_logprob"]:
            raise ValueError("return_logprobs / return_cumulative_logprob: not supported by this engine")
        sp = data.get("sampling_parameters")
        if sp is not None and sp.size:
            sampling_json = sp.reshape(-1)[0]
            sampling_json = sampling_json.decode("utf-8") if isinstance(sampling_json, bytes) else str(sampling_json)
        else:
            sampling_json = json.dumps(params)  # the vLLM backend falls back to the request parameters
        sampling = sampling_from_json(sampling_json)
        ids = self.engine.model.tokenize(text, add_special=False, parse_special=True)
        if not ids:
            raise ValueError("text_input: the prompt is empty")
        window = self.engine.info.context_length
        if len(ids) >= window:
            raise ValueError(f"text_input: the prompt has {len(ids)} tokens; the context window is {window}")
        req = ValidatedRequest(request_id=uuid.uuid4().hex, model=self.model_name, prompt_token_ids=tuple(ids),
                               sampling=sampling)
        return req, text, stream, prepend, wanted

    def _response(self, wanted: dict, text: str, finish: str | None, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        out = {"text_output": _bytes([text])}
        if wanted["return_finish_reason"]:
            out["finish_reason"] = _bytes([str(finish)])  # "None" until finished, as vLLM's str(None)
        if wanted["return_num_input_tokens"]:
            out["num_input_tokens"] = np.array([n_in], dtype=np.uint32)
        if wanted["return_num_output_tokens"]:
            out["num_output_tokens"] = np.array([n_out], dtype=np.uint32)
        return out

    async def _generate(self, data, params, marker: str, triton_id: str) -> AsyncIterator[dict[str, np.ndarray]]:
        req, prompt, stream, prepend, wanted = self._parse(data, params)
        n_in, sent, pending, answer = len(req.prompt_token_ids), 0, 0, []
        extra = {"request": triton_id or req.request_id, "prompt_tokens": n_in}
        abort = asyncio.Event()
        self._aborts[id(abort)] = (asyncio.get_running_loop(), abort)
        stoppers = [asyncio.ensure_future(abort.wait())]
        if marker:
            stoppers.append(asyncio.ensure_future(_wait_for(marker)))
        chunks = self.engine.generate(req)
        step: asyncio.Future | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(chunks))
                await asyncio.wait({step, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # closing the engine's generator frees its sequence at the next step
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
                    if abort.is_set():  # the server is stopping: end the stream as vLLM ends an aborted request
                        log.warning("request aborted: the server is stopping",
                                    extra={**extra, "generated_tokens": sent})
                        text = "" if stream else (prompt if prepend else "") + "".join(answer)
                        yield self._response(wanted, text, "abort", n_in, pending)
                        return
                    self.cancelled_total += 1
                    log.info("request cancelled by the client; generation stopped",
                             extra={**extra, "generated_tokens": sent})
                    return
                try:
                    chunk: TokenChunk = step.result()
                except StopAsyncIteration:
                    raise RuntimeError("the engine ended the stream without a finish reason") from None
                answer.append(chunk.text)
                if chunk.finish is None:
                    pending += len(chunk.token_ids)
                    if stream and chunk.text:  # a partial UTF-8 character waits for the next token
                        yield self._response(wanted, chunk.text, None, n_in, pending)
                        sent, pending = sent + pending, 0
                    continue
                if chunk.finish not in _FINISH:
                    raise RuntimeError("the engine failed to generate")
                done = chunk.usage.completion_tokens if chunk.usage else sent
                text = chunk.text if stream else (prompt if prepend else "") + "".join(answer)
                yield self._response(wanted, text, _FINISH[chunk.finish], n_in, max(done - sent, 0) if stream else done)
                log.debug("request finished", extra={**extra, "finish": chunk.finish.value, "generated_tokens": done})
                return
        finally:
            self._aborts.pop(id(abort), None)
            for task in stoppers:
                task.cancel()
            if step is not None and not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            await chunks.aclose()
            if marker:
                _unlink(marker)


async def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(CANCEL_POLL_SECONDS)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
