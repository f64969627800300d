"""An OpenAI-compatible HTTP server in front of the serving engine (engine.py):

    python serve.py                                   # the embedded SmolLM2 on http://127.0.0.1:8000
    python serve.py --slots 8 --api_key secret --compile
    torchrun --nproc_per_node=3 serve.py              # tensor parallel: 3 processes share each step (tp.py)

Endpoints: POST /v1/chat/completions (through the checkpoint's chat template) and /v1/completions, streamed
as server-sent events or not; GET /v1/models, /health (503 until the model is loaded and warm), /metrics
(Prometheus text). Errors are JSON, {"error": {"message", "type", "param", "code"}}, with the HTTP status
that names them. HTTP comes from the standard library (ThreadingHTTPServer: one thread per connection,
which only parses, waits on its request's queue and writes): no dependency, and all the work that matters
happens on the engine's one thread. Under torchrun, rank 0 serves HTTP and runs the engine and its scheduler,
and every other rank makes the same model calls on its share of the weights and of the KV cache (follow).
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import quantized_kv_cache
import tp
from checkpoint import stored_weights
from cli import UsageError, fail, pick_device
from engine import Busy, Engine, ModelRunner, Request, decode_logits
from generation import compile_step, slots_to_attend
from metrics import prometheus_text
from model import Transformer
from prepare import activation_dtype, prepare
from runtime import announce_cache, cache_rows_in_budget, checkpoint_tokenizer, load_checkpoint, model_flags
from sampling import Sampling
from scheduler import FirstComeFirstServed, SkipJoinMLFQ
from tokenizer import TextStream


class BadRequest(Exception):
    """A request the server refuses: its HTTP status, message, and the field at fault."""

    def __init__(self, status: HTTPStatus, message: str, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def field(body: dict, name: str, kinds, default=None, check=lambda value: True, rule: str = ""):
    """body[name], checked to be one of kinds (and to pass check), or default where it is absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or not check(value):
        expected = rule or " or ".join(kind.__name__ for kind in kinds)
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"'{name}' must be {expected}, not {json.dumps(value)}", name)
    return value


UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "response_format", "suffix", "echo",
               "best_of", "logit_bias")


def sampling_fields(body: dict, max_seq_length: int, prompt_length: int, default_max_tokens: int) -> dict:
    """The fields every completion request shares, checked: Request's keyword arguments."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"'{name}' is not supported by this server", name)
    if field(body, "n", (int,), 1) != 1:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "'n' must be 1: this server makes one choice per request", "n")
    max_tokens = field(body, "max_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    max_tokens = field(body, "max_completion_tokens", (int,), max_tokens, lambda v: v >= 1, "an integer >= 1")
    room = max_seq_length - prompt_length
    max_tokens = min(default_max_tokens, room) if max_tokens is None else max_tokens
    if max_tokens > room or room < 1:
        raise BadRequest(HTTPStatus.BAD_REQUEST,
                         f"the prompt ({prompt_length} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                         f"{max_seq_length} tokens: shorten the prompt or lower max_tokens", "max_tokens",
                         "context_length_exceeded")
    temperature = field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2")
    top_p = field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = field(body, "top_k", (int,), None, lambda v: v >= 1, "an integer >= 1")
    stop = field(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (
        len(v) <= 4 and all(isinstance(s, str) for s in v)), "a string or a list of up to 4 strings")
    return {"max_tokens": max_tokens, "seed": field(body, "seed", (int,)),
            "sampling": Sampling(temperature=float(temperature), top_k=top_k, top_p=None if top_p >= 1 else top_p),
            "stop": [stop] if isinstance(stop, str) else stop}


def message_text(message) -> str:
    """A chat message's content: a string, or a list of text parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str) or not isinstance(message.get("role"), str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "each of 'messages' must be an object with a string 'role' and "
                         "a string (or text parts) 'content'", "messages")
    return content


class Server(ThreadingHTTPServer):
    """The HTTP server, holding what its handlers share: the engine (None until it is ready), tokenizer,
    model name and API key."""
    daemon_threads = True

    def __init__(self, address, api_key=None):
        super().__init__(address, Handler)
        self.api_key, self.engine, self.tokenizer, self.model_name = api_key, None, None, ""
        self.created = int(time.time())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args):  # one line per request is noise on a busy server's terminal
        pass

    # --- routing ---------------------------------------------------------------------------------------
    def do_GET(self):
        self.route({"/health": self.health, "/v1/models": self.models, "/metrics": self.metrics})

    def do_POST(self):
        self.route({"/v1/chat/completions": self.chat_completions, "/v1/completions": self.completions})

    def do_PUT(self):
        self.route({})

    do_DELETE = do_PATCH = do_PUT

    def route(self, routes: dict):
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in routes:
                known = path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
                raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                                 f"{self.command} {path} is not " + ("allowed" if known else "an endpoint here"))
            if path.startswith("/v1/"):
                self.authorize()
            routes[path]()
        except BadRequest as error:
            self.send_json(error.status, {"error": {"message": error.message, "param": error.param,
                                                    "code": error.code, "type": error_type(error.status)}},
                           {"Retry-After": "1"} if error.status == HTTPStatus.TOO_MANY_REQUESTS else {})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def authorize(self):
        key = self.server.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise BadRequest(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    def ready_engine(self) -> Engine:
        if self.server.engine is None:
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading: retry shortly")
        return self.server.engine

    # --- GET ---------------------------------------------------------------------------------------------
    def health(self):
        ready = self.server.engine is not None
        self.send_json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                       {"status": "ok" if ready else "loading"})

    def models(self):
        self.send_json(HTTPStatus.OK, {"object": "list", "data": [{
            "id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "brisk"}]})

    def metrics(self):
        text = prometheus_text(self.ready_engine().snapshot())
        self.send_bytes(HTTPStatus.OK, text.encode(), "text/plain; version=0.0.4")

    # --- POST --------------------------------------------------------------------------------------------
    def read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return body

    def completions(self):
        engine, body = self.ready_engine(), self.read_body()
        prompt = field(body, "prompt", (str, list), None, lambda v: isinstance(v, str) or (
            len(v) == 1 and isinstance(v[0], str)), "a string")
        if prompt is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'prompt' is required", "prompt")
        ids = self.server.tokenizer.encode(prompt if isinstance(prompt, str) else prompt[0])
        if not ids:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'prompt' is empty and this tokenizer adds no BOS token", "prompt")
        self.complete(engine, body, ids, 16, chat=False)

    def chat_completions(self):
        engine, body = self.ready_engine(), self.read_body()
        messages = field(body, "messages", (list,), None, lambda v: len(v) > 0, "a non-empty list")
        if messages is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'messages' is required", "messages")
        turns = [{"role": message["role"], "content": message_text(message)} for message in messages]
        tokenizer = self.server.tokenizer
        try:
            ids = tokenizer.encode(tokenizer.render_chat(turns))
        except ValueError as error:  # the template refused the conversation (roles out of order, ...)
            raise BadRequest(HTTPStatus.BAD_REQUEST, str(error), "messages") from None
        self.complete(engine, body, ids, engine.max_seq_length, chat=True)

    def complete(self, engine: Engine, body: dict, ids: list, default_max_tokens: int, chat: bool):
        fields = sampling_fields(body, engine.max_seq_length, len(ids), default_max_tokens)
        stream = field(body, "stream", (bool,), False)
        include_usage = stream and field(body, "stream_options", (dict,), {}).get("include_usage") is True
        stop_ids = frozenset() if field(body, "ignore_eos", (bool,), False) else frozenset(
            self.server.tokenizer.stop_ids)
        request = Request(ids, fields["max_tokens"], fields["sampling"], stop_ids, fields["seed"])
        try:
            engine.submit(request)
        except Busy as error:
            raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS, f"the server is busy ({error}): retry later") from None
        reply = Reply(self, request, TextStream(self.server.tokenizer, fields["stop"]), chat)
        reply.stream(include_usage) if stream else reply.whole()

    # --- writing -----------------------------------------------------------------------------------------
    def send_json(self, status: HTTPStatus, payload: dict, headers: dict = {}):
        self.send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def send_bytes(self, status: HTTPStatus, data: bytes, content_type: str, headers: dict = {}):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def error_type(status: HTTPStatus) -> str:
    return {HTTPStatus.UNAUTHORIZED: "authentication_error", HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
            HTTPStatus.NOT_FOUND: "not_found_error", HTTPStatus.SERVICE_UNAVAILABLE: "server_error"}.get(
        status, "invalid_request_error")


class Reply:
    """One completion's answer, whole or streamed, in the OpenAI shapes (chat or text completion)."""

    def __init__(self, handler: Handler, request: Request, text: TextStream, chat: bool):
        self.handler, self.request, self.text, self.chat = handler, request, text, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def pieces(self):
        """(text, None) pieces as tokens come, then ("", finish reason). A stop string ends the request."""
        while True:
            event = self.request.events.get()
            if isinstance(event, str):
                yield self.text.flush(), event if not self.text.stopped else "stop"
                return
            piece = self.text.push(event)
            if self.text.stopped:
                self.request.cancel("stop")
                yield piece, None
                yield "", "stop"
                return
            yield piece, None

    def usage(self) -> dict:
        prompt, completion = len(self.request.prompt), self.request.generated
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.request.cached_tokens}}

    def envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.handler.server.model_name,
                "choices": choices}

    def whole(self):
        text, reason = "", None
        for piece, reason in self.pieces():
            text += piece
        if reason == "cancelled":
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text})
        payload = self.envelope([{**choice, "finish_reason": reason, "logprobs": None}], chunk=False)
        self.handler.send_json(HTTPStatus.OK, {**payload, "usage": self.usage()})

    def stream(self, include_usage: bool):
        handler = self.handler
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            if self.chat:
                self.send_chunk(self.choice("", None, role=True))
            for piece, reason in self.pieces():
                if piece or reason:
                    self.send_chunk(self.choice(piece, None if reason == "cancelled" else reason))
            if include_usage:
                self.send_chunk({**self.envelope([], chunk=True), "usage": self.usage()})
            self.send_event(b"data: [DONE]\n\n")
            handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.request.cancel()  # the client went away: its row is freed at the engine's next step

    def choice(self, piece: str, reason, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None}
        return self.envelope([choice], chunk=True)

    def send_chunk(self, payload: dict):
        self.send_event(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def send_event(self, data: bytes):
        # one HTTP/1.1 chunk per event: its length in hex, the bytes, CRLF; flushed so the client sees it now
        self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.handler.wfile.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(parser, "compile the decode step (waits before serving)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, help="sequences decoded together (rows of the KV cache; default 4, or "
                        "as many as --memory_budget holds)")
    parser.add_argument("--max_seq_length", type=int, default=2048, help="prompt + completion tokens per slot")
    parser.add_argument("--prefill_chunk", type=int, default=256, help="prompt tokens prefilled per step")
    parser.add_argument("--max_waiting", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--schedule", default="mlfq", choices=["mlfq", "fcfs"],
                        help="who gets the slots: FastServe's skip-join MLFQ with preemption, or first come "
                             "first served")
    parser.add_argument("--api_key", default=os.environ.get("BRISK_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $BRISK_API_KEY; none: open)")
    parser.add_argument("--memory_budget", help="memory the KV cache may take (each rank's, under torchrun), e.g. "
                        "500MB: as many slots of --max_seq_length as it holds (at most --slots, if given)")
    return parser.parse_args(argv)


def check_args(args):
    given_slots = 1 if args.slots is None else args.slots
    for flag, value, least in (("--slots", given_slots, 1), ("--max_seq_length", args.max_seq_length, 2),
                               ("--prefill_chunk", args.prefill_chunk, 1), ("--max_waiting", args.max_waiting, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, not {value}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, not {args.port}")


def load(args) -> tuple:
    """The tokenizer, and the runner of the model (this rank's share of it under torchrun, with its KV cache type
    and decode step) over as many cache rows as --slots and --memory_budget give."""
    device = pick_device(args.device)
    step = "compiled" if args.compile else "eager"
    dtype = activation_dtype(args.dtype, device, step, stored_weights(args.checkpoint_path))
    tokenizer = checkpoint_tokenizer(args.checkpoint_path)
    model = prepare(quantized_kv_cache.use(load_checkpoint(args.checkpoint_path, device, dtype), args.kv_cache),
                    device, step)
    decode = compile_step(decode_logits, device) if args.compile else decode_logits
    max_seq_length = min(args.max_seq_length, model.args.max_seq_length)  # no longer than the model was trained for
    return tokenizer, ModelRunner(model, rows_within_budget(args, model, max_seq_length), max_seq_length, decode)


def rows_within_budget(args, model: Transformer, max_seq_length: int) -> int:
    """--slots, or with --memory_budget as many cache rows of max_seq_length as it holds (at most --slots)."""
    if not args.memory_budget:
        return args.slots or 4
    fits = cache_rows_in_budget(model, args.memory_budget, max_seq_length, args.kv_cache)
    return min(fits, args.slots or fits)


def build_engine(args) -> tuple:
    """The tokenizer and a warm engine (a compiled step compiled for every attention length it will use) with
    its scheduler."""
    tokenizer, runner = load(args)
    announce_cache(runner.model, args.kv_cache)
    if args.compile:
        warm_up(runner)
    scheduler = mlfq(runner, args.prefill_chunk) if args.schedule == "mlfq" else FirstComeFirstServed()
    return tokenizer, Engine(runner, scheduler, args.prefill_chunk, args.max_waiting, static_rows=args.compile)


@torch.no_grad()
def warm_up(runner: ModelRunner):
    """Run the compiled step once at every attention length a request can reach (256, 512, ... slots), before
    the server says it is ready."""
    attended = slots_to_attend(1, runner.max_seq_length)
    runner.dummy_step(attended)
    while attended < runner.max_seq_length:
        attended = slots_to_attend(attended + 1, runner.max_seq_length)
        runner.dummy_step(attended)


def mlfq(runner: ModelRunner, prefill_chunk: int) -> SkipJoinMLFQ:
    """FastServe's scheduler with quanta from this machine: the smallest is one decode step over every row; a
    prompt's prefill takes its share of a full chunk's time (what the engine charges it while it prefills)."""
    step_seconds, chunk_seconds = runner.measure(prefill_chunk)
    return SkipJoinMLFQ(step_seconds, lambda length: length / prefill_chunk * chunk_seconds)


def serve(args) -> int:
    """Listen at once (/health answers 503 while loading), load, then serve until interrupted."""
    try:
        server = Server((args.host, args.port), args.api_key)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror}): pick another --port") from None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tokenizer, engine = build_engine(args)
    except UsageError:
        server.shutdown()
        raise
    name = args.checkpoint_path if args.checkpoint_path.is_dir() else args.checkpoint_path.parent
    server.tokenizer, server.model_name = tokenizer, name.name
    server.engine = engine
    print(f"serving {server.model_name} on http://{args.host}:{server.server_port}/v1 ({len(engine.rows)} slots)",
          file=sys.stderr, flush=True)
    # Ctrl-C stops the engine after its iteration (under torchrun, the other ranks with it), from a thread of its
    # own: the handler may run while this thread holds the engine's lock
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=engine.stop).start())
    # The engine loops on this thread, the one that loaded and measured the model. GNU OpenMP gives each thread
    # that opens parallel regions a team of its own, and once the teams' threads outnumber the cores, their
    # workers stop spinning between regions: on another thread every small parallel op of a step would wait
    # for a wake-up (docs/serving.md).
    engine.run()
    server.shutdown()
    return 0


def follow(args) -> int:
    """A rank other than 0 under torchrun: no HTTP, no scheduler; it makes each model call rank 0's engine makes
    (warm-up and measurement included), on its share, until rank 0 stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 says when to stop
    _, runner = load(args)
    runner.follow()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        # the other ranks wait in a collective for rank 0's next call as long as the server is idle: no timeout
        tp.init(pick_device(args.device), timeout=timedelta(days=365))
        tp.quiet_other_ranks()
        status = serve(args) if tp.rank() == 0 else follow(args)
    except UsageError as error:  # a rank that fails exits; torchrun then stops the others
        return fail(str(error))
    tp.finish()
    return status


if __name__ == "__main__":
    sys.exit(main())
