"""The serving engine: many requests decoded together by one model, each in a row of the KV cache of its own
(what serve.py's --slots counts, as llama-server calls them), each row one sequence at its own length.

Two parts, as in nano-vLLM: the `ModelRunner` owns the model, its cache and every call on the device; the
`Engine` owns the requests and runs iteration-level scheduling (Orca, Yu et al. 2022) on one thread: before
each step, ended requests leave their rows, and the scheduler (scheduler.py) says which waiting requests
join the free rows and which running ones give theirs up (preempted: their KV rows are copied out, and
copied back into whichever row they get next); a joining prompt is prefilled one chunk per iteration, so
that the others keep decoding beside it, in the same pass as their decode step over the rows, each at its own
position (mixed_step.py). A request's tokens come back through its events as they are made, masked by its
grammar where it has one (grammar.py); what the engine counts is metrics.py's. api.py puts HTTP in front of
this.
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
from grammar import Constraint
from metrics import Histogram, Snapshot
from mixed_step import mixed_logits
from model import ForwardOptions, Transformer
from sampling import Penalties, Sampling, penalize, sample


class Busy(Exception):
    """More requests wait than the engine accepts (serve.py answers 429)."""


@dataclass(eq=False)  # a request is equal only to itself, whatever its fields
class Request:
    """One sequence to continue. The engine puts each new token id on `events` (a queue, or anything with put)
    as it is made, then the reason it finished: "stop" (a stop token, not put), "length" (max_tokens reached) or
    "cancelled"."""
    prompt: list
    max_tokens: int
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0))
    stop_ids: frozenset = frozenset()
    seed: Optional[int] = None
    penalties: Optional[Penalties] = None
    logprobs: Optional[int] = None  # with each token made, its log-probability and the `logprobs` likeliest
    constraint: Optional[Constraint] = None  # structured output: the grammar its tokens keep to (grammar.py)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: Optional[str] = None  # why the client's side ended it (a disconnect, a stop string met)
    arrived: float = field(default_factory=time.perf_counter)
    # the engine's bookkeeping: prompt tokens in the cache, the token to feed next and where it goes
    prefilled: int = 0
    cached_tokens: int = 0  # of those, the ones a previous request left in its row (prefix reuse)
    next_token: int = 0
    position: int = 0  # tokens in the cache
    output: list = field(default_factory=list)  # the token ids made so far
    # with logprobs: for each token made, (its log-probability, [(id, log-probability) of the likeliest])
    token_logprobs: list = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    swapped: bool = False  # preempted: its KV rows wait in host memory (ModelRunner.saved) for a row
    last_token_at: Optional[float] = None  # when its last token was made (time.perf_counter)

    @property
    def generated(self) -> int:
        return len(self.output)

    @property
    def tokens_in_cache(self) -> list:
        """The ids whose keys and values its row holds: the prompt, then each token made and fed back."""
        return (self.prompt + self.output)[:self.position]

    @property
    def decoding(self) -> bool:
        """Whether its prompt is all in the cache (it decodes from now on)."""
        return self.prefilled == len(self.prompt)

    def cancel(self, reason: str = "cancelled"):
        """End the request at the engine's next iteration, freeing its row; reason: its outcome in /metrics."""
        self.cancelled = reason


def decode_logits(model: Transformer, tokens: Tensor, input_pos: Tensor, attended_slots: int) -> Tensor:
    """One decode step over the rows: tokens (rows, 1), each row at its own cache slot input_pos (rows, 1).
    A function of its own so that --compile can compile it (static shapes: every row, each step)."""
    return model(tokens, input_pos, ForwardOptions(attended_slots=attended_slots))[:, -1]


class ModelRunner:
    """The model and its KV cache of `rows` rows, and every call the engine makes on them, in plain data (token
    ids, rows, slots) so that every tensor-parallel rank can make it alike. The calls are `commands`, by name:
    under torchrun, rank 0's engine calls `run`, which sends the command to the other ranks before making it;
    each of them sits in `follow`, making every command it hears on its own share of the heads and of the cache
    (tp.py), until `stop`. Alone, `run` just makes the call. Every rank computes the same logits; only rank 0's
    are sampled."""

    def __init__(self, model: Transformer, rows: int, max_seq_length: int, decode: Callable = decode_logits):
        model.setup_caches(rows, max_seq_length)
        self.model, self.rows, self.decode, self.device = model, rows, decode, model.rope.device
        self.saved = {}  # preempted requests' KV rows in host memory: key -> each layer's (keys, values)
        self.commands = {"decode_rows": self.decode_rows, "prefill": self.prefill, "mixed": self.mixed,
                         "swap_out": self.swap_out, "swap_in": self.swap_in, "forget": self.forget,
                         "copy_slots": self.copy_slots}

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    def run(self, command: str, *args):
        tp.on_rank_0(lambda: (command, args))  # under torchrun: the other ranks, in follow(), hear it
        return self.commands[command](*args)

    def stop(self):
        """The engine has stopped: the other ranks leave follow()."""
        tp.on_rank_0(lambda: ("stop", ()))

    @torch.no_grad()
    def follow(self):
        """The other ranks' loop: make each command rank 0 makes, until it says "stop"."""
        while (message := tp.on_rank_0(lambda: None))[0] != "stop":
            command, args = message
            self.commands[command](*args)

    def decode_rows(self, tokens: list, positions: list, attended: int) -> Tensor:
        """One decode step: row i feeds tokens[i] at cache slot positions[i]; the logits of every row."""
        return self.decode(self.model, torch.tensor(tokens, device=self.device)[:, None],
                           torch.tensor(positions, device=self.device)[:, None], attended)

    def prefill(self, row: int, tokens: list, start: int, attended: int) -> Tensor:
        """Prompt tokens into the cache row from slot start on; the last one's logits."""
        return self.model(torch.tensor([tokens], device=self.device),
                          torch.arange(start, start + len(tokens), device=self.device),
                          ForwardOptions(cache_row=row, attended_slots=attended, logits_from=-1))[:, -1]

    def mixed(self, tokens: list, positions: list, attended: int, row: int, chunk: list, start: int,
              chunk_attended: int) -> tuple:
        """decode_rows' step and prefill's chunk in one pass (mixed_step.py): both their logits."""
        return mixed_logits(self.model, torch.tensor(tokens, device=self.device)[:, None],
                            torch.tensor(positions, device=self.device)[:, None], attended,
                            torch.tensor([chunk], device=self.device),
                            torch.arange(start, start + len(chunk), device=self.device), row, chunk_attended)

    def swap_out(self, row: int, length: int, key: int):
        """Copy the first `length` slots of a cache row to host memory, kept under key. On CUDA the copy goes to
        pinned memory without waiting: the stream orders it before any later write to the row."""
        pinned = self.device.type == "cuda"
        self.saved[key] = [tuple(torch.empty_like(buffer[row, :, :length], device="cpu", pin_memory=pinned)
                                 .copy_(buffer[row, :, :length], non_blocking=pinned)
                                 for buffer in layer.attention.kv_cache.buffers())  # a quantized one's scales too
                           for layer in self.model.layers]

    def swap_in(self, row: int, length: int, key: int):
        """The KV slots kept under key back into a cache row (any row: a sequence's positions are slots, not
        rows)."""
        for layer, kept in zip(self.model.layers, self.saved.pop(key)):
            for buffer, slots in zip(layer.attention.kv_cache.buffers(), kept):
                buffer[row, :, :length].copy_(slots, non_blocking=True)

    def copy_slots(self, source: int, target: int, length: int):
        """The first `length` slots of one cache row copied into another (a quantized cache's scales too)."""
        for layer in self.model.layers:
            for buffer in layer.attention.kv_cache.buffers():
                buffer[target, :, :length].copy_(buffer[source, :, :length])

    def forget(self, key: int):
        """A preempted request ended before it got a row back: its kept rows go."""
        del self.saved[key]

    def dummy_step(self, attended: Optional[int] = None):
        """A decode step on dummy rows at the cache's last slot (which no prompt reaches), attending over
        `attended` slots (the fewest by default): what a compiled step is warmed up with."""
        last = self.max_seq_length - 1
        attended = attended or slots_to_attend(1, self.max_seq_length)
        self.run("decode_rows", [0] * self.rows, [last] * self.rows, attended)

    def dummy_chunk(self, length: int):
        """A prompt chunk of `length` dummy tokens prefilled into row 0."""
        self.run("prefill", 0, [0] * length, 0, slots_to_attend(length, self.max_seq_length))

    @torch.no_grad()
    def measure(self, prefill_chunk: int) -> tuple:
        """Seconds of one decode step over every row and of one prefill chunk, measured on dummy rows before any
        request comes (the second of two runs each): what MLFQ's quanta and prefill estimates are made of."""
        timings = []
        chunk = min(prefill_chunk, self.max_seq_length - 1)
        for run in (self.dummy_step, lambda: self.dummy_chunk(chunk)):
            run()
            started = time.perf_counter()
            run()
            timings.append(time.perf_counter() - started)
        return tuple(timings)


class Engine:
    """The requests, the scheduler that holds the waiting ones, and the loop that runs them (`run`) through the
    runner.

    scheduler: who gets the rows (scheduler.py). prefill_chunk: prompt tokens prefilled per iteration while no
    row decodes. max_waiting: requests that may wait for a row before submit() refuses more (Busy). static_rows:
    every decode step runs over every row (a compiled step: one shape); otherwise over the rows up to the last
    busy one. mixed_chunk: prompt tokens prefilled per iteration beside decoding rows, in one pass with their
    step (mixed_step.py): what the decoding rows wait for between two tokens."""

    def __init__(self, runner: ModelRunner, scheduler, prefill_chunk: int = 256, max_waiting: int = 64,
                 static_rows: bool = False, mixed_chunk: int = 32):
        self.runner, self.scheduler = runner, scheduler
        self.prefill_chunk, self.max_waiting, self.static_rows = prefill_chunk, max_waiting, static_rows
        self.mixed_chunk = mixed_chunk
        self.rows: list = [None] * runner.rows  # the request in each cache row, None where it is free
        # the token ids whose keys and values each row holds from its last request (a free row keeps them until
        # another request writes over them), for the next request that starts with the same tokens
        self.kept: list = [[] for _ in range(runner.rows)]
        self.condition = threading.Condition()  # guards the scheduler; wakes the loop when a request arrives
        self.stopped = False
        self.counts = collections.Counter()  # for /metrics: requests by outcome, tokens, steps, preemptions
        self.time_to_first_token, self.inter_token_latency = Histogram(), Histogram()

    @property
    def max_seq_length(self) -> int:
        return self.runner.max_seq_length

    def submit(self, request: Request):
        """Queue a request (its prompt plus max_tokens must fit the cache: serve.py checks before)."""
        if request.seed is not None:
            request.generator = torch.Generator(self.runner.device).manual_seed(request.seed)
        with self.condition:
            # requests that free rows will take at the next iteration do not count as waiting
            if len(self.scheduler.waiting(time.perf_counter())) >= self.max_waiting + self.rows.count(None):
                raise Busy(f"{self.queue_depth()} requests are waiting for a slot already")
            uncached = len(request.prompt) - max(shared_prefix(kept, request.prompt) for kept in self.kept)
            self.scheduler.add(request, uncached, time.perf_counter())
            self.condition.notify()

    def queue_depth(self) -> int:
        """Requests waiting that no free row will take at the next iteration."""
        with self.condition:
            return max(0, len(self.scheduler.waiting(time.perf_counter())) - self.rows.count(None))

    def snapshot(self) -> Snapshot:
        """The figures /metrics shows, as they stand."""
        with self.condition:
            return Snapshot(collections.Counter(self.counts), self.scheduler.waiting_per_queue(),
                            sum(request is not None for request in self.rows), self.time_to_first_token.copy(),
                            self.inter_token_latency.copy())

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
        self.runner.stop()

    def iteration(self):
        """End the cancelled requests, preempt and join as the scheduler says, then one pass: a prompt's chunk
        beside a decode step, or either alone."""
        now = time.perf_counter()
        with self.condition:
            for request in self.scheduler.waiting(now) + list(filter(None, self.rows)):
                if request.cancelled:
                    self.end(request, request.cancelled)
            preempt, join = self.scheduler.plan(list(filter(None, self.rows)), self.rows.count(None), now)
        for request in preempt:
            self.swap_out(request)
        for request in join:
            self.place(request)
        # one pass: the next chunk of the first row still prefilling beside a decode step over the rows decoding,
        # or either alone; each request is charged the time of the work done for it
        prefilling = next((row for row, request in enumerate(self.rows)
                           if request is not None and not request.decoding), None)
        decoding = [request for request in self.rows if request is not None and request.decoding]
        chunk_request, started = self.rows[prefilling] if prefilling is not None else None, time.perf_counter()
        if chunk_request is not None and decoding:
            chunk_length = self.mixed_step(prefilling)
            # every token of the pass costs alike: the chunk's share to its request, the rest to the decoding ones
            elapsed, tokens = time.perf_counter() - started, chunk_length + len(decoding)
            self.charge([chunk_request], elapsed * chunk_length / tokens)
            self.charge(decoding, elapsed * len(decoding) / tokens)
        elif chunk_request is not None:
            self.prefill(prefilling)
            self.charge([chunk_request], time.perf_counter() - started)
        elif decoding:
            self.decode_step()
            self.charge(decoding, time.perf_counter() - started)

    def charge(self, requests: list, seconds: float):
        """Tell the scheduler that these seconds of running went to these requests (those it still holds: not
        the ones that have just ended)."""
        with self.condition:
            requests = [r for r in requests if id(r) in self.scheduler.jobs]
            if requests:
                self.scheduler.charge(requests, seconds, time.perf_counter())

    def swap_out(self, request: Request):
        """Preempt a running request: its KV rows are copied out (to host memory) and its row is freed."""
        self.runner.run("swap_out", self.rows.index(request), request.position, id(request))
        self.leave(request)
        request.swapped = True
        self.counts["preemptions"] += 1

    def place(self, request: Request):
        """A joining request takes the free row whose kept tokens start as its prompt does for longest, and
        prefills only the rest (at least its last token, whose logits give the first new one): keys and values
        depend only on the tokens up to their own, so the kept ones are what a prefill would write (to float
        rounding, where a kept token was decoded: its keys and values came from a one-row pass). A preempted
        request gets its own KV rows back instead."""
        shared = {row: shared_prefix(self.kept[row], request.prompt)
                  for row, occupant in enumerate(self.rows) if occupant is None}
        row = max(shared, key=shared.get)  # the lowest such row where several share as much
        self.rows[row] = request
        if request.swapped:
            self.runner.run("swap_in", row, request.position, id(request))
            request.swapped = False
            self.counts["swaps_in"] += 1
        else:
            self.reuse(request, min(shared[row], len(request.prompt) - 1))

    def prefill(self, row: int):
        """The next chunk of the row's prompt into the cache; after the last chunk, its first token."""
        start, chunk = self.next_chunk(row, self.prefill_chunk)
        logits = self.runner.run("prefill", row, chunk, start, slots_to_attend(start + len(chunk), self.max_seq_length))
        self.chunk_done(row, len(chunk), logits)

    def next_chunk(self, row: int, length: int) -> tuple:
        """(first slot, tokens) of the row's next prompt chunk of up to `length` tokens, after whatever another
        row shares of it."""
        self.take_shared_prefix(row)
        start = self.rows[row].prefilled
        return start, self.rows[row].prompt[start:start + length]

    def chunk_done(self, row: int, length: int, logits: Tensor):
        """A chunk of `length` tokens is in the row's cache; logits: its last token's. After the prompt's last
        chunk, the request's first token."""
        request = self.rows[row]
        request.prefilled = request.position = request.prefilled + length
        self.counts["prompt_tokens"] += length
        if request.decoding:
            self.emit(request, self.next_token(request, logits))

    def take_shared_prefix(self, row: int):
        """Before a prompt's next chunk: where another busy row holds more of this prompt than this row does,
        those slots are copied over instead of computed. So the copies of one request (n > 1) prefill their
        prompt once, as do requests that arrive together with one system prompt."""
        request = self.rows[row]
        shared = {other: min(shared_prefix(occupant.tokens_in_cache, request.prompt), len(request.prompt) - 1)
                  for other, occupant in enumerate(self.rows) if occupant is not None and other != row}
        source = max(shared, key=shared.get, default=None)
        if source is not None and shared[source] > request.prefilled:
            self.runner.run("copy_slots", source, row, shared[source])
            self.reuse(request, shared[source])

    def reuse(self, request: Request, length: int):
        """The first `length` tokens of the request's prompt are in its row already, kept there or copied: they
        count as cached, and its prefill goes on after them."""
        self.counts["cached_prompt_tokens"] += length - request.prefilled
        request.cached_tokens += length - request.prefilled
        request.prefilled = request.position = length

    def decode_step(self):
        """One step over the rows decoding (decode_batch)."""
        batch = self.decode_batch(self.static_rows)
        self.decoded(batch[0], self.runner.run("decode_rows", *batch[1:]))

    def mixed_step(self, row: int) -> int:
        """A decode step and the next chunk of the row's prompt in one pass (mixed_step.py): the chunk's length."""
        live, tokens, positions, attended = self.decode_batch(static_rows=False)
        start, chunk = self.next_chunk(row, self.mixed_chunk)
        logits, chunk_logits = self.runner.run("mixed", tokens, positions, attended, row, chunk, start,
                                               slots_to_attend(start + len(chunk), self.max_seq_length))
        self.decoded(live, logits)
        self.chunk_done(row, len(chunk), chunk_logits)
        return len(chunk)

    def decode_batch(self, static_rows: bool) -> tuple:
        """A decode step's rows: (whether each decodes, each one's token, cache slot, the slots attention reads).
        Every row where static_rows (a compiled step: static shapes), else the rows up to the last one decoding
        (requests take the lowest free rows, so these are few when few requests run). A row that is free or
        still prefilling decodes a dummy token at the cache's last slot, which no prompt reaches (a prompt
        leaves room for at least one new token) and which a sequence that gets there writes itself before
        reading."""
        last = self.max_seq_length - 1
        live = [request is not None and request.decoding for request in self.rows]
        if not static_rows:
            live = live[:max(row for row, decodes in enumerate(live) if decodes) + 1]
        tokens = [request.next_token if decodes else 0 for request, decodes in zip(self.rows, live)]
        positions = [request.position if decodes else last for request, decodes in zip(self.rows, live)]
        attended = slots_to_attend(max(p for p, decodes in zip(positions, live) if decodes) + 1, self.max_seq_length)
        return live, tokens, positions, attended

    def decoded(self, live: list, logits: Tensor):
        """Each decoding row's next token from its logits (rows, vocab)."""
        self.counts["decode_steps"] += 1
        for row, decodes in enumerate(live):
            if decodes:
                request = self.rows[row]
                request.position += 1
                self.emit(request, self.next_token(request, logits[row:row + 1]))

    def next_token(self, request: Request, logits: Tensor) -> int:
        """The request's next token from its (1, vocab) logits: its penalties, its grammar's mask, then its
        sampling. Asked for, the model's own log-probabilities (before penalties, mask and temperature, as vLLM
        gives them) go with it."""
        model_logits = logits
        if request.penalties is not None:
            logits = penalize(logits, request.penalties, request.prompt, request.output)
        if request.constraint is not None:
            logits = request.constraint.mask(logits)
        token = sample(logits, request.sampling, request.generator).item()
        if request.constraint is not None:
            request.constraint.advance(token)
        if request.logprobs is not None:
            logprobs = model_logits[0].float().log_softmax(-1)
            top = logprobs.topk(request.logprobs)
            request.token_logprobs.append((logprobs[token].item(), list(zip(top.indices.tolist(),
                                                                             top.values.tolist()))))
        return token

    def emit(self, request: Request, token: int):
        """A new token of a running request: sent on, or the request ends."""
        now = time.perf_counter()
        request.output.append(token)
        self.counts["completion_tokens"] += 1
        latency = self.inter_token_latency if request.last_token_at else self.time_to_first_token
        latency.observe(now - (request.last_token_at or request.arrived))
        request.last_token_at = now
        if token in request.stop_ids:
            self.end(request, "stop")
            return
        request.events.put(token)
        request.next_token = token
        if request.generated == request.max_tokens:
            self.end(request, "length")

    def leave(self, request: Request):
        """A running request gives up its row, which keeps the request's tokens for whoever shares them next."""
        row = self.rows.index(request)
        with self.condition:
            self.rows[row], self.kept[row] = None, request.tokens_in_cache

    def end(self, request: Request, reason: str):
        """A request is over, running, preempted or waiting: it leaves its row, the scheduler forgets it, its
        client hears why."""
        if request in self.rows:
            self.leave(request)
        with self.condition:
            self.scheduler.remove(request)
        if request.swapped:
            self.runner.run("forget", id(request))
        self.counts[f"requests_{reason}"] += 1
        request.events.put(reason)


def shared_prefix(kept: list, prompt: list) -> int:
    """How many tokens two lists of ids share from their start."""
    shared = 0
    for a, b in zip(kept, prompt):
        if a != b:
            break
        shared += 1
    return shared
