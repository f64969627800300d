"""The serving engine: many requests decoded together by one model, each in a slot of its own.

The KV cache has one row per slot, and each slot holds one sequence at its own length. One thread owns the
model and runs iteration-level scheduling (Orca, Yu et al. 2022): before each step, finished and cancelled
requests leave their slots, and the scheduler (scheduler.py) says which waiting requests join the free
slots and which running ones give theirs up (preempted: their KV rows are copied out, and copied back into
whichever slot they get next); a joining prompt is prefilled one chunk per iteration, so that the others keep
decoding beside it; then one decode step runs over every slot at once, each row at its own position. A
request's tokens come back through its queue as they are made; `TextStream` turns them into text. serve.py
puts HTTP in front of this.
"""
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

import tp
from generation import slots_to_attend
from model import ForwardOptions, Transformer
from sampling import Sampling, sample
from scheduler import FirstComeFirstServed
from tokenizer import StreamDecoder, Tokenizer


class Histogram:
    """Observations counted into cumulative buckets, as Prometheus histograms are: bucket i counts those at
    most bounds[i]; the last bucket (+Inf) counts all of them."""

    def __init__(self, bounds: tuple):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1
        self.sum += value


LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


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
    position: int = 0  # tokens in the cache
    generated: int = 0
    generator: Optional[torch.Generator] = None
    swapped: bool = False  # preempted: its KV rows wait in host memory (SlotModel.saved) for a slot
    last_token_at: Optional[float] = None  # when its last token was made (time.perf_counter)

    @property
    def decoding(self) -> bool:
        """Whether its prompt is all in the cache (it decodes from now on)."""
        return self.prefilled == len(self.prompt)

    def cancel(self, reason: str = "cancelled"):
        """End the request at the engine's next iteration, freeing its slot; reason: its outcome in /metrics."""
        self.cancelled = reason


def decode_logits(model: Transformer, tokens: Tensor, input_pos: Tensor, attended_slots: int) -> Tensor:
    """One decode step over the slots: tokens (rows, 1), each row at its own cache slot input_pos (rows, 1).
    A function of its own so that --compile can compile it (static shapes: every slot, each step)."""
    return model(tokens, input_pos, ForwardOptions(attended_slots=attended_slots))[:, -1]


class SlotModel:
    """The model and its KV cache of `slots` rows, and what the engine does with them, asked for in plain data
    (token ids, slots, positions) so that every tensor-parallel rank can do it alike. Under torchrun, rank 0's
    engine calls `run`, which sends the call to the other ranks before making it; each of them sits in `follow`,
    making every call it hears on its own share of the heads and of the cache (tp.py). Alone, `run` just calls.
    Every rank computes the same logits; only rank 0's are sampled."""

    def __init__(self, model: Transformer, slots: int, max_seq_length: int, decode: Callable = decode_logits):
        model.setup_caches(slots, max_seq_length)
        self.model, self.decode, self.device = model, decode, model.rope.device
        self.saved = {}  # preempted requests' KV rows in host memory: key -> each layer's (keys, values)

    def run(self, call: str, *args):
        tp.on_rank_0(lambda: (call, args))  # under torchrun: the other ranks, in follow(), hear it
        return getattr(self, call)(*args)

    @torch.no_grad()
    def follow(self):
        """The other ranks' loop: make each call rank 0 makes, until it stops."""
        call = None
        while call != "stop":
            call, args = tp.on_rank_0(lambda: None)
            getattr(self, call)(*args)

    def stop(self):
        """The engine has stopped (the followers leave `follow`)."""

    def decode_rows(self, tokens: list, positions: list, attended: int) -> Tensor:
        """One decode step: row i feeds tokens[i] at cache slot positions[i]; the logits of every row."""
        return self.decode(self.model, torch.tensor(tokens, device=self.device)[:, None],
                           torch.tensor(positions, device=self.device)[:, None], attended)

    def prefill(self, row: int, tokens: list, start: int, attended: int) -> Tensor:
        """Prompt tokens into the cache row from slot start on; the last one's logits."""
        return self.model(torch.tensor([tokens], device=self.device),
                          torch.arange(start, start + len(tokens), device=self.device),
                          ForwardOptions(cache_row=row, attended_slots=attended, logits_from=-1))[:, -1]

    def swap_out(self, row: int, length: int, key: int):
        """Copy the first `length` slots of a cache row to host memory, kept under key. On CUDA the copy goes to
        pinned memory without waiting: the stream orders it before any later write to the row."""
        pinned = self.device.type == "cuda"
        self.saved[key] = [tuple(torch.empty_like(buffer[row, :, :length], device="cpu", pin_memory=pinned)
                                 .copy_(buffer[row, :, :length], non_blocking=pinned)
                                 for buffer in layer.attention.kv_cache.buffers())  # a quantized one's scales too
                           for layer in self.model.layers]

    def swap_in(self, row: int, length: int, key: int):
        """The KV slots kept under key back into a cache row (any row: positions are slots, not rows)."""
        for layer, kept in zip(self.model.layers, self.saved.pop(key)):
            for buffer, slots in zip(layer.attention.kv_cache.buffers(), kept):
                buffer[row, :, :length].copy_(slots, non_blocking=True)

    def forget(self, key: int):
        """A preempted request ended before it got a slot back: its kept rows go."""
        del self.saved[key]


class Engine:
    """Slots, the scheduler that holds the waiting requests, and the loop that runs them (`run`, on a thread of
    its own).

    decode: decode_logits, or a compiled form of it. prefill_chunk: prompt tokens prefilled per iteration.
    max_waiting: requests that may wait for a slot before submit() refuses more (Busy). scheduler: who gets
    the slots (scheduler.py; first come first served by default). static_rows: every decode step runs over
    every slot (a compiled step: one shape); otherwise over the slots up to the last busy one."""

    def __init__(self, model: Transformer, slots: int, max_seq_length: int, prefill_chunk: int = 256,
                 max_waiting: int = 64, decode: Callable = decode_logits, scheduler=None, static_rows: bool = False):
        self.slot_model = SlotModel(model, slots, max_seq_length, decode)
        self.prefill_chunk, self.max_waiting, self.static_rows = prefill_chunk, max_waiting, static_rows
        self.scheduler = scheduler or FirstComeFirstServed()
        self.device = model.rope.device
        self.slots: list = [None] * slots  # the request in each slot, None where it is free
        self.condition = threading.Condition()  # guards the scheduler; wakes the loop when a request arrives
        self.stopped = False
        self.counts = collections.Counter()  # for /metrics: requests by outcome, tokens, steps, preemptions
        self.time_to_first_token, self.inter_token_latency = Histogram(LATENCY_BOUNDS), Histogram(LATENCY_BOUNDS)

    @property
    def max_seq_length(self) -> int:
        return self.slot_model.model.max_seq_length

    def submit(self, request: Request):
        """Queue a request (its prompt plus max_tokens must fit the cache: serve.py checks before)."""
        if request.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.seed)
        with self.condition:
            # requests that free slots will take at the next iteration do not count as waiting
            if len(self.scheduler.waiting(time.perf_counter())) >= self.max_waiting + self.slots.count(None):
                raise Busy(f"{self.queue_depth()} requests are waiting for a slot already")
            self.scheduler.add(request, len(request.prompt), time.perf_counter())
            self.condition.notify()

    def queue_depth(self) -> int:
        """Requests waiting that no free slot will take at the next iteration."""
        with self.condition:
            return max(0, len(self.scheduler.waiting(time.perf_counter())) - self.slots.count(None))

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
                while not self.stopped and not self.scheduler.jobs:
                    self.condition.wait()
                if self.stopped:
                    break
            self.iteration()
        for job in list(self.scheduler.jobs.values()):
            job.request.events.put("cancelled")
        self.slot_model.run("stop")

    def iteration(self):
        """Leave, preempt and join as the scheduler says, one prefill chunk, one decode step."""
        now = time.perf_counter()
        with self.condition:
            for request in self.scheduler.waiting(now):
                if request.cancelled:
                    self.end(request, request.cancelled)
            for slot, request in enumerate(self.slots):
                if request is not None and request.cancelled:
                    self.finish(slot, request.cancelled)
            preempt, join = self.scheduler.plan(list(filter(None, self.slots)), self.slots.count(None), now)
        for request in preempt:
            self.swap_out(request)
        for request in join:
            self.place(request)
        # each request is charged the time of the work done for it: its prompt's chunk, or the decode step
        prefilling = [slot for slot, request in enumerate(self.slots) if request is not None and not request.decoding]
        if prefilling:
            request, started = self.slots[prefilling[0]], time.perf_counter()
            self.prefill(prefilling[0])
            self.charge([request], started)
        decoding = [request for request in self.slots if request is not None and request.decoding]
        if decoding:
            started = time.perf_counter()
            self.decode_step()
            self.charge(decoding, started)

    def charge(self, requests: list, started: float):
        """Tell the scheduler that the time since `started` went to these requests (those it still holds: not
        the ones that have just finished)."""
        with self.condition:
            now, requests = time.perf_counter(), [r for r in requests if id(r) in self.scheduler.jobs]
            if requests:
                self.scheduler.charge(requests, now - started, now)

    @torch.no_grad()
    def measure(self) -> tuple:
        """Seconds of one decode step over every slot and of one prefill chunk, measured on dummy rows before
        any request comes (the second of two runs each): what MLFQ's quanta and prefill estimates are
        made of."""
        timings = []
        for run in (self.dummy_step, self.dummy_chunk):
            run()
            started = time.perf_counter()
            run()
            timings.append(time.perf_counter() - started)
        return tuple(timings)

    def dummy_step(self, attended: Optional[int] = None):
        """A decode step on dummy rows at the cache's last slot (which no prompt reaches), attending over
        `attended` slots (the fewest by default): what a compiled step is warmed up with."""
        slots, last = len(self.slots), self.max_seq_length - 1
        attended = attended or slots_to_attend(1, self.max_seq_length)
        self.slot_model.run("decode_rows", [0] * slots, [last] * slots, attended)

    def dummy_chunk(self):
        length = min(self.prefill_chunk, self.max_seq_length - 1)
        self.slot_model.run("prefill", 0, [0] * length, 0, slots_to_attend(length, self.max_seq_length))

    def swap_out(self, request: Request):
        """Preempt a running request: its KV rows are copied out (to host memory) and its slot is freed."""
        slot = self.slots.index(request)
        self.slot_model.run("swap_out", slot, request.position, id(request))
        request.swapped, self.slots[slot] = True, None
        self.counts["preemptions"] += 1

    def place(self, request: Request):
        """A joining request takes a free slot; a preempted one gets its KV rows back there."""
        slot = self.slots.index(None)
        self.slots[slot] = request
        if request.swapped:
            self.slot_model.run("swap_in", slot, request.position, id(request))
            request.swapped = False
            self.counts["swaps_in"] += 1

    def prefill(self, slot: int):
        """The next chunk of the slot's prompt into its cache row; after the last chunk, its first token."""
        request = self.slots[slot]
        start = request.prefilled
        chunk = request.prompt[start:start + self.prefill_chunk]
        end = start + len(chunk)
        logits = self.slot_model.run("prefill", slot, chunk, start, slots_to_attend(end, self.max_seq_length))
        request.prefilled = request.position = end
        self.counts["prompt_tokens"] += len(chunk)
        if request.decoding:
            self.emit(slot, sample(logits, request.sampling, request.generator).item())

    def decode_step(self):
        """One step over the slots: every slot in a compiled step (static shapes), else the slots up to the last
        one decoding (requests take the lowest free slots, so these are few when few requests run). A row that
        is free or still prefilling decodes a dummy token at the cache's last slot, which no prompt reaches (a
        prompt leaves room for at least one new token) and which a sequence that gets there writes itself
        before reading."""
        last = self.max_seq_length - 1
        decoding = [request is not None and request.decoding for request in self.slots]
        if not self.static_rows:
            decoding = decoding[:max(slot for slot, live in enumerate(decoding) if live) + 1]
        tokens = [request.next_token if live else 0 for request, live in zip(self.slots, decoding)]
        positions = [request.position if live else last for request, live in zip(self.slots, decoding)]
        attended = slots_to_attend(max(p for p, live in zip(positions, decoding) if live) + 1, self.max_seq_length)
        logits = self.slot_model.run("decode_rows", tokens, positions, attended)
        self.counts["decode_steps"] += 1
        for slot, live in enumerate(decoding):
            if live:
                request = self.slots[slot]
                request.position += 1
                self.emit(slot, sample(logits[slot:slot + 1], request.sampling, request.generator).item())

    def emit(self, slot: int, token: int):
        """A new token of the slot's request: sent on, or the request finishes."""
        request, now = self.slots[slot], time.perf_counter()
        request.generated += 1
        self.counts["completion_tokens"] += 1
        latency = self.inter_token_latency if request.last_token_at else self.time_to_first_token
        latency.observe(now - (request.last_token_at or request.arrived))
        request.last_token_at = now
        if token in request.stop_ids:
            self.finish(slot, "stop")
            return
        request.events.put(token)
        request.next_token = token
        if request.generated == request.max_tokens:
            self.finish(slot, "length")

    def finish(self, slot: int, reason: str):
        self.end(self.slots[slot], reason)
        self.slots[slot] = None

    def end(self, request: Request, reason: str):
        """A request is over (running or waiting): the scheduler forgets it, its client hears why."""
        with self.condition:
            self.scheduler.remove(request)
        if request.swapped:
            self.slot_model.run("forget", id(request))
        self.counts[f"requests_{reason}"] += 1
        request.events.put(reason)


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
