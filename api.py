"""The OpenAI-compatible HTTP API in front of the serving engine (engine.py); serve.py is its command line.

Endpoints: POST /v1/chat/completions (through the checkpoint's chat template) and /v1/completions, streamed
as server-sent events or not; GET / (a chat page, chat.html), /v1/models and /v1/models/{id}, /health (503
until the model is loaded and warm), /metrics (Prometheus text); llama-server's POST /tokenize and /detokenize;
OPTIONS for browsers (CORS only with an allowed origin). Errors are JSON, {"error": {"message", "type", "param",
"code"}}, with the HTTP status that names them, a bug's included (500). HTTP comes from the standard library
(ThreadingHTTPServer: one thread per connection, which only parses, waits on its request's queue and writes,
within the Limits): no dependency, and all the work that matters happens on the engine's one thread.
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
from pathlib import Path

import llguidance

from api_request import (BadRequest, chat_turn, field, logprobs_field, response_format_field,
                         sampling_fields)
from engine import Busy, Engine, Request
from grammar import Constraint, grammar_tokenizer
from metrics import prometheus_text
from sampling import Penalties
from tokenizer import TextStream


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
        self.vocabulary, self.vocabulary_lock = None, threading.Lock()

    def grammar_vocabulary(self) -> llguidance.LLTokenizer:
        """The tokenizer's index for structured output (grammar.py), built for the first request that asks."""
        with self.vocabulary_lock:
            if self.vocabulary is None:
                self.vocabulary = grammar_tokenizer(self.tokenizer)
            return self.vocabulary

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


CHAT_PAGE = Path(__file__).resolve().parent / "chat.html"
KNOWN_PATHS = ("", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize",
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
        self.route({"": self.chat_page, "/health": self.health, "/v1/models": self.models, "/metrics": self.metrics})

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
    def chat_page(self):
        """The chat page (chat.html), which calls this server's API from the browser."""
        self.send_bytes(HTTPStatus.OK, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8")

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
        grammar = response_format_field(body, self.server.grammar_vocabulary)
        stream = field(body, "stream", (bool,), False)
        include_usage = stream and field(body, "stream_options", (dict,), {}).get("include_usage") is True
        stop_ids, penalties = frozenset(self.server.tokenizer.stop_ids), fields["penalties"]
        if field(body, "ignore_eos", (bool,), False):
            # as llama-server does: no end-of-text token can be picked, so the text goes on as prose (not
            # through one, into a turn the model writes for the user)
            penalties = penalties or Penalties()
            banned = tuple((token, -float("inf")) for token in sorted(stop_ids))
            stop_ids, penalties = frozenset(), replace(penalties, logit_bias=penalties.logit_bias + banned)
        events, seed = queue.Queue(), fields["seed"]
        # n copies of the request, each its own answer (copy i seeded with seed + i); they share the prompt's
        # prefill (Engine.take_shared_prefix)
        requests = [Request(ids, fields["max_tokens"], fields["sampling"], stop_ids,
                            None if seed is None else seed + index, penalties, logprobs_field(body, chat),
                            Constraint(self.server.grammar_vocabulary(), grammar) if grammar else None,
                            ChoiceEvents(events, index))
                    for index in range(fields["n"])]
        try:
            for request in requests:
                engine.submit(request)
        except Busy as error:
            for request in requests:
                request.cancel()
            raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS, f"the server is busy ({error}): retry later") from None
        reply = Reply(self, [Choice(request, TextStream(self.server.tokenizer, fields["stop"])) for request in requests],
                      events, chat)
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


class ChoiceEvents:
    """Where the engine puts the events of one of a reply's requests (engine.Request.events): the reply's one
    queue, each event tagged with the index of the choice it belongs to."""

    def __init__(self, events: queue.Queue, index: int):
        self.events, self.index = events, index

    def put(self, event):
        self.events.put((self.index, event))


class Choice:
    """One of a reply's n answers: its request, its text as it comes, and how it finished (None while it runs)."""

    def __init__(self, request: Request, text: TextStream):
        self.request, self.text = request, text
        self.finish_reason = None
        self.received_tokens = 0  # so far: the next one's log-probabilities are at this index
        self.new_logprobs = []  # with logprobs: (token text, log-probability, [(text, log-probability)]) not yet sent


class Reply:
    """One completion's answer, its n choices whole or streamed, in the OpenAI shapes (chat or text completion)."""

    def __init__(self, handler: Handler, choices: list, events: queue.Queue, chat: bool):
        self.handler, self.choices, self.events, self.chat = handler, choices, events, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def pieces(self, watch_client: bool = False):
        """(choice, text) pieces as tokens come, and (choice, "") once a choice has finished, until all have. A
        stop string ends its choice's request, and, with watch_client (a whole answer, which writes nothing until
        the end), the client leaving ends them all."""
        while any(choice.finish_reason is None for choice in self.choices):
            try:
                index, event = self.events.get(timeout=0.25 if watch_client else None)
            except queue.Empty:
                if self.handler.client_gone():
                    self.cancel()
                    self.handler.close_connection = True
                continue
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # what the engine made before it heard that a stop string ended the choice
            if isinstance(event, str):
                piece = choice.text.flush()
                choice.finish_reason = "stop" if choice.text.stopped else event
                yield choice, piece
                continue
            piece = choice.text.push(event)
            if choice.request.logprobs is not None:
                logprob, top = choice.request.token_logprobs[choice.received_tokens]
                decode = self.handler.server.tokenizer.decode
                choice.new_logprobs.append((decode([event]), logprob, [(decode([id_]), lp) for id_, lp in top]))
            choice.received_tokens += 1
            if choice.text.stopped:  # a stop string: the text ends before it, and so does the choice's request
                choice.request.cancel("stop")
                choice.finish_reason = "stop"
            yield choice, piece

    def cancel(self):
        for choice in self.choices:
            choice.request.cancel()

    def usage(self) -> dict:
        """The prompt counted once (its copies share its prefill), the completions of every choice."""
        first = self.choices[0].request
        prompt, completion = len(first.prompt), sum(choice.request.generated for choice in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}

    def envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.handler.server.model_name,
                "choices": choices}

    def whole(self):
        texts = {id(choice): "" for choice in self.choices}
        for choice, piece in self.pieces(watch_client=True):
            texts[id(choice)] += piece
        reasons = {choice.finish_reason for choice in self.choices}
        if "cancelled" in reasons and self.handler.close_connection:
            return  # the client left: nobody to answer
        if "cancelled" in reasons:
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        choices = []
        for index, choice in enumerate(self.choices):
            text = texts[id(choice)]
            answer = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": index, **answer, "finish_reason": choice.finish_reason,
                            "logprobs": self.take_logprobs(choice)})
        self.handler.send_json(HTTPStatus.OK, {**self.envelope(choices, chunk=False), "usage": self.usage()})

    def stream(self, include_usage: bool):
        handler = self.handler
        handler.start_reply(HTTPStatus.OK, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                            "Transfer-Encoding": "chunked"})
        try:
            if self.chat:
                for choice in self.choices:
                    self.send_chunk(self.chunk(choice, "", role=True))
            for choice, piece in self.pieces():
                if piece or choice.finish_reason:
                    self.send_chunk(self.chunk(choice, piece))
            if include_usage:
                self.send_chunk({**self.envelope([], chunk=True), "usage": self.usage()})
            self.send_event(b"data: [DONE]\n\n")
            handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.cancel()  # the client went away: the rows are freed at the engine's next step

    def chunk(self, choice: Choice, piece: str, role: bool = False) -> dict:
        """One streamed event of a choice: its new text, and its finish reason once it has finished."""
        reason = None if choice.finish_reason == "cancelled" else choice.finish_reason
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            answer = {"delta": delta}
        else:
            answer = {"text": piece}
        index = self.choices.index(choice)
        return self.envelope([{"index": index, **answer, "finish_reason": None if role else reason,
                               "logprobs": self.take_logprobs(choice)}], chunk=True)

    def take_logprobs(self, choice: Choice):
        """The log-probabilities of the choice's tokens received since the last call, in the shape of the API
        (chat: {"content": [...]}; completions: parallel lists), or None where none were asked for."""
        if choice.request.logprobs is None:
            return None
        entries, choice.new_logprobs = choice.new_logprobs, []
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
