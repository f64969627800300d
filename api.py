"""The OpenAI-compatible HTTP API in front of the serving engine (engine.py); serve.py is its command line.

Endpoints: POST /v1/chat/completions (through the checkpoint's chat template) and /v1/completions, streamed
as server-sent events or not; GET /v1/models and /v1/models/{id}, /health (503 until the model is loaded and
warm), /metrics (Prometheus text); llama-server's POST /tokenize and /detokenize; OPTIONS for browsers (CORS
only with an allowed origin). Errors are JSON, {"error": {"message", "type", "param", "code"}}, with the HTTP
status that names them, a bug's included (500). HTTP comes from the standard library (ThreadingHTTPServer: one
thread per connection, which only parses, waits on its request's queue and writes, within the Limits): no
dependency, and all the work that matters happens on the engine's one thread.
"""
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from engine import Busy, Engine, Request
from metrics import prometheus_text
from sampling import Penalties, Sampling
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


UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "suffix", "echo", "best_of")


def penalty_fields(body: dict, vocab_size: int) -> Optional[Penalties]:
    """presence_penalty, frequency_penalty, repetition_penalty and logit_bias, checked; None where all are
    neutral."""
    presence = field(body, "presence_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2, "a number from -2 to 2")
    frequency = field(body, "frequency_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2, "a number from -2 to 2")
    repetition = field(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0, "a number above 0")
    bias = field(body, "logit_bias", (dict,), {}, lambda v: all(
        key.isdigit() and int(key) < vocab_size and isinstance(value, (int, float)) and not isinstance(value, bool)
        and -100 <= value <= 100 for key, value in v.items()),
        f"an object of token ids (0 to {vocab_size - 1}) to numbers from -100 to 100")
    penalties = Penalties(float(presence), float(frequency), float(repetition),
                          tuple((int(token), float(value)) for token, value in bias.items()))
    return None if penalties == Penalties() else penalties


def sampling_fields(body: dict, max_seq_length: int, prompt_length: int, default_max_tokens: int,
                    vocab_size: int) -> dict:
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
    min_p = field(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1, "a number from 0 to 1")
    stop = field(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (
        len(v) <= 4 and all(isinstance(s, str) for s in v)), "a string or a list of up to 4 strings")
    sampling = Sampling(temperature=float(temperature), top_k=top_k, top_p=None if top_p >= 1 else top_p,
                        min_p=float(min_p) or None)
    return {"max_tokens": max_tokens, "seed": field(body, "seed", (int,)), "sampling": sampling,
            "stop": [stop] if isinstance(stop, str) else stop, "penalties": penalty_fields(body, vocab_size)}


def logprobs_field(body: dict, chat: bool) -> Optional[int]:
    """How many likeliest tokens to give with each token's log-probability, or None for no log-probabilities:
    chat's logprobs (true / false) and top_logprobs (0 to 20); completions' logprobs (0 to 5)."""
    if not chat:
        return field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5, "an integer from 0 to 5")
    top = field(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
    if not field(body, "logprobs", (bool,), False):
        if top is not None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


def chat_turn(message) -> dict:
    """A chat message as the chat template takes it: its role, and its content as one string (OpenAI's content
    may also be a list of text parts)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str) or not isinstance(message.get("role"), str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "each of 'messages' must be an object with a string 'role' and "
                         "a string (or text parts) 'content'", "messages")
    return {"role": message["role"], "content": content}


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server. max_request_bytes: a larger body gets 413. idle_timeout_s: a
    connection that sends nothing (or takes nothing of a reply) this long is closed, so a stalled client does
    not hold a thread forever. max_connections: connections served at once, a thread each; past them, 503."""
    max_request_bytes: int = 1_000_000
    idle_timeout_s: float = 60.0
    max_connections: int = 64


class Server(ThreadingHTTPServer):
    """The HTTP server, holding what its handlers share: the engine (None until it is ready), tokenizer,
    model name, API key, the origin browsers may call it from (CORS; None: only its own) and its limits."""
    daemon_threads = True

    def __init__(self, address, api_key=None, cors_origin=None, limits: Limits = Limits()):
        super().__init__(address, Handler)
        self.api_key, self.engine, self.tokenizer, self.model_name = api_key, None, None, ""
        self.cors_origin, self.limits = cors_origin, limits
        self.created = int(time.time())
        self.connections = threading.BoundedSemaphore(limits.max_connections)

    def process_request(self, request, client_address):
        """A thread for the connection, or, past max_connections, a JSON 503 and the connection closed."""
        if not self.connections.acquire(blocking=False):
            body = json.dumps(error_body(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections: retry later")).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1"
                                b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address):
        """A connection that failed between requests: a client that reset or let time out an idle keep-alive
        connection is ordinary and goes unsaid; anything else is one line on stderr, not a traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"serve.py: connection from {client_address[0]}: {type(error).__name__}: {error}", file=sys.stderr)


KNOWN_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize",
               "/detokenize")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self):
        self.timeout = self.server.limits.idle_timeout_s  # StreamRequestHandler.setup sets it on the socket
        super().setup()

    def log_message(self, format, *args):  # one line per request is noise on a busy server's terminal
        pass

    # --- routing ---------------------------------------------------------------------------------------
    def do_GET(self):
        self.route({"/health": self.health, "/v1/models": self.models, "/metrics": self.metrics})

    do_HEAD = do_GET  # the same status and headers; send_bytes leaves the body out

    def do_POST(self):
        self.route({"/v1/chat/completions": self.chat_completions, "/v1/completions": self.completions,
                    "/tokenize": self.tokenize, "/detokenize": self.detokenize})

    def do_OPTIONS(self):
        """What a browser asks before a cross-origin POST: the methods, and (with --cors_origin) the headers
        it may send."""
        self.replied = False
        self.send_bytes(HTTPStatus.NO_CONTENT, b"", "text/plain", {"Allow": "GET, HEAD, POST, OPTIONS"})

    def do_PUT(self):
        self.route({})

    do_DELETE = do_PATCH = do_PUT

    def route(self, routes: dict):
        path = self.path.split("?")[0].rstrip("/")
        self.replied = False  # whether a status line has gone out (a failure after it cannot send another)
        try:
            if path.startswith("/v1/models/") and self.command in ("GET", "HEAD"):
                routes = {path: lambda: self.model(path.removeprefix("/v1/models/"))}
            if path not in routes:
                known = path in KNOWN_PATHS or path.startswith("/v1/models/")
                raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                                 f"{self.command} {path} is not " + ("allowed" if known else "an endpoint here"))
            if path.startswith("/v1/"):
                self.authorize()
            routes[path]()
        except BadRequest as error:
            headers = {"Retry-After": "1"} if error.status == HTTPStatus.TOO_MANY_REQUESTS else {}
            self.send_json(error.status, error_body(error.status, error.message, error.param, error.code), headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug: the client still gets JSON, and the log the traceback
            traceback.print_exc()
            self.close_connection = True
            if not self.replied:
                self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                               error_body(HTTPStatus.INTERNAL_SERVER_ERROR, "the server failed: see its log"))

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
        self.send_json(HTTPStatus.OK, {"object": "list", "data": [self.model_card()]})

    def model(self, model_id: str):
        if model_id != self.server.model_name:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"there is no model '{model_id}' here: this server has "
                             f"'{self.server.model_name}'", "model", "model_not_found")
        self.send_json(HTTPStatus.OK, self.model_card())

    def model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "brisk"}

    def metrics(self):
        text = prometheus_text(self.ready_engine().snapshot())
        self.send_bytes(HTTPStatus.OK, text.encode(), "text/plain; version=0.0.4")

    # --- POST --------------------------------------------------------------------------------------------
    def read_body(self) -> dict:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True  # where the body ends is unknown: the connection cannot carry another
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, not '{length}'")
        if int(length) > self.server.limits.max_request_bytes:
            self.close_connection = True  # its body is never read
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body ({length} bytes) is larger "
                             f"than this server takes ({self.server.limits.max_request_bytes}: --max_request_bytes)")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"null")
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
        turns = [chat_turn(message) for message in messages]
        tokenizer = self.server.tokenizer
        try:
            ids = tokenizer.encode(tokenizer.render_chat(turns))
        except ValueError as error:  # the template refused the conversation (roles out of order, ...)
            raise BadRequest(HTTPStatus.BAD_REQUEST, str(error), "messages") from None
        self.complete(engine, body, ids, engine.max_seq_length, chat=True)

    def tokenize(self):
        """llama-server's /tokenize: {"content": text, "add_special": false} -> {"tokens": ids}."""
        self.ready_engine()
        body = self.read_body()
        content = field(body, "content", (str,), None)
        if content is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'content' is required", "content")
        add_special = field(body, "add_special", (bool,), False)
        ids = self.server.tokenizer.encode(content, bos=None if add_special else False)  # None: as the model does
        self.send_json(HTTPStatus.OK, {"tokens": ids})

    def detokenize(self):
        """llama-server's /detokenize: {"tokens": ids} -> {"content": text}."""
        self.ready_engine()
        vocab_size = self.server.tokenizer.vocab_size
        tokens = field(self.read_body(), "tokens", (list,), [], lambda v: all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in v),
            f"a list of token ids from 0 to {vocab_size - 1}")
        self.send_json(HTTPStatus.OK, {"content": self.server.tokenizer.decode(tokens)})

    def complete(self, engine: Engine, body: dict, ids: list, default_max_tokens: int, chat: bool):
        fields = sampling_fields(body, engine.max_seq_length, len(ids), default_max_tokens,
                                 self.server.tokenizer.vocab_size)
        stream = field(body, "stream", (bool,), False)
        include_usage = stream and field(body, "stream_options", (dict,), {}).get("include_usage") is True
        stop_ids, penalties = frozenset(self.server.tokenizer.stop_ids), fields["penalties"]
        if field(body, "ignore_eos", (bool,), False):
            # as llama-server does: no end-of-text token can be picked, so the text goes on as prose (not
            # through one, into a turn the model writes for the user)
            penalties = penalties or Penalties()
            banned = tuple((token, -float("inf")) for token in sorted(stop_ids))
            stop_ids, penalties = frozenset(), replace(penalties, logit_bias=penalties.logit_bias + banned)
        request = Request(ids, fields["max_tokens"], fields["sampling"], stop_ids, fields["seed"], penalties,
                          logprobs_field(body, chat))
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
        self.start_reply(status, {"Content-Type": content_type, "Content-Length": str(len(data)), **headers})
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_reply(self, status: HTTPStatus, headers: dict):
        """The status line and headers, with the CORS ones where --cors_origin allows a browser page elsewhere."""
        self.replied = True
        self.send_response(status)
        if self.server.cors_origin:
            headers = {**headers, "Access-Control-Allow-Origin": self.server.cors_origin,
                       "Access-Control-Allow-Headers": "Authorization, Content-Type",
                       "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS"}
        if self.close_connection:
            headers = {**headers, "Connection": "close"}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def client_gone(self) -> bool:
        """Whether the client has closed its side (readable, with nothing to read), while it waits for a whole
        answer."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def error_body(status: HTTPStatus, message: str, param=None, code=None) -> dict:
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "param": param, "code": code, "type": error_type(status)}}


def error_type(status: HTTPStatus) -> str:
    return {HTTPStatus.UNAUTHORIZED: "authentication_error", HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
            HTTPStatus.NOT_FOUND: "not_found_error", HTTPStatus.SERVICE_UNAVAILABLE: "server_error",
            HTTPStatus.INTERNAL_SERVER_ERROR: "server_error"}.get(
        status, "invalid_request_error")


class Reply:
    """One completion's answer, whole or streamed, in the OpenAI shapes (chat or text completion)."""

    def __init__(self, handler: Handler, request: Request, text: TextStream, chat: bool):
        self.handler, self.request, self.text, self.chat = handler, request, text, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.received_tokens = 0  # so far: the next one's log-probabilities are at this index
        self.new_logprobs = []  # with logprobs: (token text, log-probability, [(text, log-probability)]) not yet sent

    def pieces(self, watch_client: bool = False):
        """(text, None) pieces as tokens come, then ("", finish reason). A stop string ends the request, and so,
        with watch_client (a whole answer, which writes nothing until the end), does the client leaving."""
        while True:
            try:
                event = self.request.events.get(timeout=0.25 if watch_client else None)
            except queue.Empty:
                if self.handler.client_gone():
                    self.request.cancel()
                    self.handler.close_connection = True
                continue
            if isinstance(event, str):
                yield self.text.flush(), event if not self.text.stopped else "stop"
                return
            piece = self.text.push(event)
            if self.request.logprobs is not None:
                logprob, top = self.request.token_logprobs[self.received_tokens]
                decode = self.handler.server.tokenizer.decode
                self.new_logprobs.append((decode([event]), logprob, [(decode([id_]), lp) for id_, lp in top]))
            self.received_tokens += 1
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
        for piece, reason in self.pieces(watch_client=True):
            text += piece
        if reason == "cancelled" and self.handler.close_connection:
            return  # the client left: nobody to answer
        if reason == "cancelled":
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text})
        payload = self.envelope([{**choice, "finish_reason": reason, "logprobs": self.take_logprobs()}], chunk=False)
        self.handler.send_json(HTTPStatus.OK, {**payload, "usage": self.usage()})

    def stream(self, include_usage: bool):
        handler = self.handler
        handler.start_reply(HTTPStatus.OK, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                            "Transfer-Encoding": "chunked"})
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
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": self.take_logprobs()}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": reason, "logprobs": self.take_logprobs()}
        return self.envelope([choice], chunk=True)

    def take_logprobs(self):
        """The log-probabilities of the tokens received since the last call, in the shape of the API (chat:
        {"content": [...]}; completions: parallel lists), or None where none were asked for."""
        if self.request.logprobs is None:
            return None
        entries, self.new_logprobs = self.new_logprobs, []
        if self.chat:
            return {"content": [{"token": text, "logprob": logprob, "bytes": list(text.encode()),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                                  for t, lp in top]} for text, logprob, top in entries]}
        return {"tokens": [text for text, _, _ in entries], "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries]}

    def send_chunk(self, payload: dict):
        self.send_event(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def send_event(self, data: bytes):
        # one HTTP/1.1 chunk per event: its length in hex, the bytes, CRLF; flushed so the client sees it now
        self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.handler.wfile.flush()
