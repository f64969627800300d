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
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import llguidance

from api_request import (BadRequest, ToolUse, chat_turn, field, logprobs_field, response_format_field,
                         sampling_fields, tools_field)
from api_reply import Choice, ChoiceEvents, Reply
from engine import Busy, Engine, Request
from grammar import Constraint, GrammarError, grammar_tokenizer
from metrics import prometheus_text
from sampling import Penalties
from tokenizer import TextStream
from tools import ToolCallText, tool_call_grammar


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
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"'{name}' is for /v1/chat/completions", name)
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
        tools, tool_use = tools_field(body)
        tokenizer = self.server.tokenizer
        if tools and not tokenizer.supports_tools:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "this model's chat template takes no tools", "tools")
        try:
            ids = tokenizer.encode(tokenizer.render_chat(turns, tools=tools))
        except ValueError as error:  # the template refused the conversation (roles out of order, ...)
            raise BadRequest(HTTPStatus.BAD_REQUEST, str(error), "messages") from None
        self.complete(engine, body, ids, engine.max_seq_length, chat=True, tool_use=tool_use)

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

    def complete(self, engine: Engine, body: dict, ids: list, default_max_tokens: int, chat: bool,
                 tool_use: Optional[ToolUse] = None):
        fields = sampling_fields(body, engine.max_seq_length, len(ids), default_max_tokens,
                                 self.server.tokenizer.vocab_size)
        grammar = response_format_field(body, self.server.grammar_vocabulary)
        if tool_use is not None and tool_use.choice != "auto":  # a call is required: its grammar makes sure of it
            if grammar is not None:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "a response_format and a required tool call cannot both "
                                 "be kept to: drop one", "response_format")
            grammar = self.tool_call_grammar(tool_use)
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
        reply = Reply(self, [Choice(request, TextStream(self.server.tokenizer, fields["stop"]),
                                    ToolCallText() if tool_use else None) for request in requests], events, chat)
        reply.stream(include_usage) if stream else reply.whole()

    def tool_call_grammar(self, tool_use: ToolUse) -> str:
        """The grammar of the calls a request requires: of any of its functions, or of the one it names."""
        name = None if tool_use.choice == "required" else tool_use.choice
        try:
            return tool_call_grammar(tool_use.functions, self.server.tokenizer, self.server.grammar_vocabulary(),
                                     name, tool_use.parallel)
        except GrammarError as error:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"a tool's parameters cannot be enforced: {error}",
                             "tools") from None

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
