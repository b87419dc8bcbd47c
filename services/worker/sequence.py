"""One request's state inside the embedded engine (engine-thread owned,
except ``cancelled`` which the asyncio side sets)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable

from llmfabric.models.detok import IncrementalDetokenizer, StopMatcher
from llmfabric.structs import Finish, TokenChunk, Usage, ValidatedRequest


@dataclasses.dataclass(slots=True, eq=False)
class Sequence:
    """A request being prefilled or decoded."""

    request: ValidatedRequest  # what to run
    loop: asyncio.AbstractEventLoop  # where the consumer waits
    out: asyncio.Queue  # TokenChunk | BaseException, consumed by generate()
    detok: IncrementalDetokenizer  # token ids -> UTF-8-safe text
    stops: StopMatcher  # stop-sequence search
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)  # consumer went away
    seq_id: int = -1  # llama.cpp sequence id while running
    sampler: object = None  # llama.cpp sampler chain while running
    n_past: int = 0  # tokens already in the KV cache
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    generated: int = 0  # completion tokens so far
    output_ids: list[int] = dataclasses.field(default_factory=list)  # sampled tokens (the last is not yet decoded)
    lock_node: object = None  # radix node pinned for this sequence's cached prefix
    last_token: int = -1  # token to feed at the next decode step
    finished: bool = False  # final chunk sent

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    def emit(self, item: TokenChunk | BaseException) -> None:
        """Hand a chunk (or an error) to the asyncio consumer."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def accept(self, token: int, is_eog: Callable[[int], bool], context_length: int) -> None:
        """Record a sampled token, emit its text, finish when due."""
        self.last_token = token
        self.output_ids.append(token)
        if is_eog(token):  # not part of the answer: not counted, not returned
            self.finish(Finish.STOP, (), "")
            return
        self.generated += 1
        text = self.stops.push(self.detok.push(token))
        if self.stops.stopped:
            self.finish(Finish.STOP, (token,), text)
        elif self.generated >= self.request.sampling.max_tokens or len(self.prompt) + self.generated >= context_length:
            self.finish(Finish.LENGTH, (token,), text)
        else:
            self.emit(TokenChunk(token_ids=(token,), text=text))

    def finish(self, reason: Finish, token_ids: tuple[int, ...], text: str) -> None:
        """Send the last chunk with the reason and usage."""
        if self.finished:
            return
        if reason is not Finish.CANCELLED and not self.stops.stopped:
            text += self.stops.push(self.detok.finish())
            text += self.stops.finish()
        self.finished = True
        usage = Usage(prompt_tokens=len(self.prompt), completion_tokens=self.generated, cached_tokens=self.cached_tokens)
        self.emit(TokenChunk(token_ids=token_ids, text=text, finish=reason, usage=usage))
