"""The serving engine: many requests decoded together by one model, each in a slot of its own.

The KV cache has one row per slot, and each slot holds one sequence at its own length. One thread owns the
model and runs iteration-level scheduling (Orca, Yu et al. 2022): before each step, finished and cancelled
requests leave their slots and waiting ones join the free slots, first come first served; a joining prompt
is prefilled one chunk per iteration, so that the others keep decoding beside it; then one decode step runs
over every slot at once, each row at its own position. A request's tokens come back through its queue as
they are made; `TextStream` turns them into text. serve.py puts HTTP in front of this.
"""
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from generation import slots_to_attend
from model import Transformer
from sampling import Sampling, sample
from tokenizer import StreamDecoder, Tokenizer


class Busy(Exception):
    """More requests wait than the engine accepts (serve.py answers 429)."""


@dataclass
class Request:
    """One sequence to continue. The engine puts each new token id on `events` as it is made, then the reason
    it finished: "stop" (a stop token, not put), "length" (max_tokens reached) or "cancelled"."""
    prompt: list
    max_tokens: int
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0))
    stop_ids: frozenset = frozenset()
    seed: Optional[int] = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: Optional[str] = None  # why the client's side ended it (a disconnect, a stop string met)
    arrived: float = field(default_factory=time.perf_counter)
    # the engine's bookkeeping: prompt tokens in the cache, the token to feed next and where it goes
    prefilled: int = 0
    next_token: int = 0
    position: int = 0
    generated: int = 0
    generator: Optional[torch.Generator] = None

    def cancel(self, reason: str = "cancelled"):
        """End the request at the engine's next iteration, freeing its slot; reason: its outcome in /metrics."""
        self.cancelled = reason


def decode_logits(model: Transformer, tokens: Tensor, input_pos: Tensor, attended_slots: int) -> Tensor:
    """One decode step over every slot: tokens (slots, 1), each row at its own cache slot input_pos
    (slots, 1). A function of its own so that --compile can compile it (static shapes: the slot count)."""
    return model(tokens, input_pos, attended_slots=attended_slots)[:, -1]


class Engine:
    """Slots, the queue of waiting requests and the loop that runs them (`run`, on a thread of its own).

    decode: decode_logits, or a compiled form of it. prefill_chunk: prompt tokens prefilled per iteration.
    max_waiting: requests that may wait for a slot before submit() refuses more (Busy)."""

    def __init__(self, model: Transformer, slots: int, max_seq_length: int, prefill_chunk: int = 256,
                 max_waiting: int = 64, decode: Callable = decode_logits):
        model.setup_caches(slots, max_seq_length)
        self.model, self.decode, self.prefill_chunk, self.max_waiting = model, decode, prefill_chunk, max_waiting
        self.device = model.rope.device
        self.slots: list = [None] * slots  # the request in each slot, None where it is free
        self.waiting = collections.deque()
        self.condition = threading.Condition()  # guards `waiting`; wakes the loop when a request arrives
        self.stopped = False
        self.counts = collections.Counter()  # for /metrics: requests by outcome, tokens in and out, steps

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    def submit(self, request: Request):
        """Queue a request (its prompt plus max_tokens must fit the cache: serve.py checks before)."""
        if request.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.seed)
        with self.condition:
            # requests that free slots will take at the next iteration do not count as waiting
            if len(self.waiting) >= self.max_waiting + self.slots.count(None):
                raise Busy(f"{self.queue_depth()} requests are waiting for a slot already")
            self.waiting.append(request)
            self.condition.notify()

    def queue_depth(self) -> int:
        """Requests waiting that no free slot will take at the next iteration."""
        return max(0, len(self.waiting) - self.slots.count(None))

    def running(self) -> int:
        return sum(request is not None for request in self.slots)

    def stop(self):
        with self.condition:
            self.stopped = True
            self.condition.notify()

    @torch.no_grad()
    def run(self):
        """The loop: until stop(), one iteration at a time, sleeping while there is nothing to do."""
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not any(self.slots):
                    self.condition.wait()
                if self.stopped:
                    break
            self.iteration()
        for request in [*self.waiting, *filter(None, self.slots)]:
            request.events.put("cancelled")

    def iteration(self):
        """Leave, join, one prefill chunk, one decode step."""
        for slot, request in enumerate(self.slots):
            if request is not None and request.cancelled:
                self.finish(slot, request.cancelled)
        self.join()
        prefilling = [slot for slot, request in enumerate(self.slots)
                      if request is not None and request.prefilled < len(request.prompt)]
        if prefilling:
            self.prefill(prefilling[0])
        if any(request is not None and request.prefilled == len(request.prompt) for request in self.slots):
            self.decode_step()

    def join(self):
        """Free slots take waiting requests, first come first served."""
        with self.condition:
            for slot, request in enumerate(self.slots):
                while request is None and self.waiting:
                    candidate = self.waiting.popleft()
                    if candidate.cancelled:
                        self.counts[f"requests_{candidate.cancelled}"] += 1
                        candidate.events.put(candidate.cancelled)
                        continue
                    self.slots[slot] = request = candidate

    def prefill(self, slot: int):
        """The next chunk of the slot's prompt into its cache row; after the last chunk, its first token."""
        request = self.slots[slot]
        start = request.prefilled
        chunk = request.prompt[start:start + self.prefill_chunk]
        end = start + len(chunk)
        tokens = torch.tensor([chunk], device=self.device)
        input_pos = torch.arange(start, end, device=self.device)
        logits = self.model(tokens, input_pos, attended_slots=slots_to_attend(end, self.max_seq_length),
                            logits_from=-1, cache_row=slot)
        request.prefilled = end
        self.counts["prompt_tokens"] += len(chunk)
        if end == len(request.prompt):
            request.position = end
            self.emit(slot, sample(logits[:, -1], request.sampling, request.generator).item())

    def decode_step(self):
        """One step over every slot. A row that is free or still prefilling decodes a dummy token at the cache's
        last slot, which no prompt reaches (a prompt leaves room for at least one new token) and which a
        sequence that gets there writes itself before reading."""
        last = self.max_seq_length - 1
        decoding = [request is not None and request.prefilled == len(request.prompt) for request in self.slots]
        tokens = [request.next_token if live else 0 for request, live in zip(self.slots, decoding)]
        positions = [request.position if live else last for request, live in zip(self.slots, decoding)]
        attended = slots_to_attend(max(p for p, live in zip(positions, decoding) if live) + 1, self.max_seq_length)
        logits = self.decode(self.model, torch.tensor(tokens, device=self.device)[:, None],
                             torch.tensor(positions, device=self.device)[:, None], attended)
        self.counts["decode_steps"] += 1
        for slot, live in enumerate(decoding):
            if live:
                request = self.slots[slot]
                request.position += 1
                self.emit(slot, sample(logits[slot:slot + 1], request.sampling, request.generator).item())

    def emit(self, slot: int, token: int):
        """A new token of the slot's request: sent on, or the request finishes."""
        request = self.slots[slot]
        request.generated += 1
        self.counts["completion_tokens"] += 1
        if token in request.stop_ids:
            self.finish(slot, "stop")
            return
        request.events.put(token)
        request.next_token = token
        if request.generated == request.max_tokens:
            self.finish(slot, "length")

    def finish(self, slot: int, reason: str):
        self.counts[f"requests_{reason}"] += 1
        self.slots[slot].events.put(reason)
        self.slots[slot] = None


class TextStream:
    """A request's tokens as text, piece by piece: never half a UTF-8 character, and never text that might
    still turn out to be the start of one of the stop strings (held back until it cannot). `push` returns the
    text that is safe to show; `stopped` says a stop string was met (it and what follows are never shown)."""

    def __init__(self, tokenizer: Tokenizer, stop: list):
        self.decoder, self.stop = StreamDecoder(tokenizer), [s for s in stop if s]
        self.pending, self.stopped = "", False

    def push(self, token_id: int) -> str:
        return self.release(self.pending + self.decoder.push(token_id))

    def flush(self) -> str:
        """What is held back, once no more tokens will come."""
        text = self.release(self.pending + self.decoder.flush())
        text, self.pending = text + self.pending, ""
        return text

    def release(self, text: str) -> str:
        if self.stopped:
            return ""
        found = [text.index(stop) for stop in self.stop if stop in text]
        if found:
            self.stopped, self.pending = True, ""
            return text[:min(found)]
        # hold back the longest tail that begins some stop string
        held = max((n for stop in self.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.pending = text[len(text) - held:]
        return text[:len(text) - held]
