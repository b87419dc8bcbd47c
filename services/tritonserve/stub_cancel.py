"""Request cancellation for PyTriton's decoupled proxy model (runs inside Triton).

PyTriton's proxy model (``pytriton/proxy/model.py``, which Triton's Python
backend runs in its stub process) forwards requests to the inference callable
over ZeroMQ and responses back, but never asks Triton whether a request was
cancelled, and has no way to tell the callable. The vLLM backend does both:
after each non-final ``response_sender.send`` it asks
``response_sender.is_cancelled()`` and aborts the engine's request. This file
is shipped next to the proxy model and ``install(globals())`` is appended to
it (see ``server.py``):

* every request forwarded to the callable gets two request parameters,
  ``llmfabric_cancel_marker`` (a path in a directory the launcher chose) and
  ``llmfabric_triton_request_id`` (the client's request id, for logs);
* the proxy's response senders are wrapped: after each non-final response
  they ask ``is_cancelled()`` as the vLLM backend does (never after the final
  one: the request is gone by then), and once Triton reports the request
  cancelled the marker file is created; the callable sees it, stops the
  engine and ends the stream, which completes the request as usual.

A request is thus noticed as cancelled at its next response (as in the vLLM
backend), not while it waits for its first token.

It imports nothing from llmfabric: it runs in Triton's stub process and only
touches names of the proxy module it is installed into.
"""

from __future__ import annotations

import os
import pathlib
import uuid

CANCEL_DIR_ENV = "LLMFABRIC_TRITONSERVE_CANCEL_DIR"  # set by the launcher, inherited through tritonserver
MARKER_PARAM = "llmfabric_cancel_marker"
REQUEST_ID_PARAM = "llmfabric_triton_request_id"


def install(ns: dict) -> None:
    """Replace the proxy module's requests server and decoupled responses
    handler (looked up by name when the model initializes) with subclasses
    that carry cancellation to the inference callable."""
    cancel_dir = os.environ.get(CANCEL_DIR_ENV)
    if not cancel_dir:
        return  # launched by something else: plain PyTriton behaviour
    folder = pathlib.Path(cancel_dir)
    final_flag = ns["pb_utils"].TRITONSERVER_RESPONSE_COMPLETE_FINAL
    markers: dict[int, pathlib.Path] = {}  # id(triton request) -> its marker path, while in flight
    base_server, base_handler = ns["TritonRequestsServer"], ns["DecoupledResponsesHandler"]

    class CancelAwareRequestsServer(base_server):
        def _wrap_request(self, triton_request, inputs, span=None):
            request = super()._wrap_request(triton_request, inputs, span)
            marker = markers.setdefault(id(triton_request), folder / uuid.uuid4().hex)
            params = dict(request.parameters or {})
            params[MARKER_PARAM] = str(marker)
            params[REQUEST_ID_PARAM] = triton_request.request_id()
            request.parameters = params
            return request

    class Sender:
        """A response sender that checks for cancellation after each non-final response."""

        def __init__(self, sender, request_id: str, marker: pathlib.Path | None) -> None:
            self._sender, self._request_id, self._marker = sender, request_id, marker

        def send(self, response=None, flags=0):
            self._sender.send(response, flags)
            if self._marker is not None and not flags & final_flag and self._sender.is_cancelled():
                ns["LOGGER"].info(f"request {self._request_id!r} cancelled by the client")
                self._marker.touch()
                self._marker = None

    class Request:
        """A Triton request whose response sender is a ``Sender``."""

        def __init__(self, request) -> None:
            self._request = request

        def __getattr__(self, name):
            return getattr(self._request, name)

        def get_response_sender(self):
            marker = markers.get(id(self._request))
            return Sender(self._request.get_response_sender(), self._request.request_id(), marker)

    class CancelAwareDecoupledResponsesHandler(base_handler):
        async def handle_responses(self, scope, responses_queue, responses_future):
            triton_requests = self._requests_map[scope["requests_id"]]
            originals = list(triton_requests)
            self._requests_map[scope["requests_id"]] = [Request(r) for r in originals]
            try:
                return await super().handle_responses(scope, responses_queue, responses_future)
            finally:
                for req in originals:
                    marker = markers.pop(id(req), None)
                    if marker is not None:
                        marker.unlink(missing_ok=True)

    ns["TritonRequestsServer"] = CancelAwareRequestsServer
    ns["DecoupledResponsesHandler"] = CancelAwareDecoupledResponsesHandler
