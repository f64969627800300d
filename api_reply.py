"""A completion's answer in the OpenAI API's shapes (chat or text completion), whole or streamed as server-sent
events: its n choices, each read from its engine request's events as they come (api.py's handler writes it).
"""
import json
import queue
import time
import uuid
from http import HTTPStatus
from typing import Optional

from api_request import BadRequest
from engine import Request
from tokenizer import TextStream
from tools import ToolCallText


class ChoiceEvents:
    """Where the engine puts the events of one of a reply's requests (engine.Request.events): the reply's one
    queue, each event tagged with the index of the choice it belongs to."""

    def __init__(self, events: queue.Queue, index: int):
        self.events, self.index = events, index

    def put(self, event):
        self.events.put((self.index, event))


class Choice:
    """One of a reply's n answers: its request, its text as it comes (a stop string ends it; where the model may
    call tools, a call is held back and read when the answer ends), and how it finished (None while it runs)."""

    def __init__(self, request: Request, text: TextStream, tool_text: Optional[ToolCallText] = None):
        self.request, self.text, self.tool_text = request, text, tool_text
        self.finish_reason = None
        self.tool_calls = None  # the calls it made, in the API's shape, once it has finished
        self.received_tokens = 0  # so far: the next one's log-probabilities are at this index
        self.new_logprobs = []  # with logprobs: (token text, log-probability, [(text, log-probability)]) not yet sent

    def push(self, token: int) -> str:
        """The text that can be shown now that this token has come."""
        piece = self.text.push(token)
        return piece if self.tool_text is None else self.tool_text.push(piece)

    def finish(self, reason: str) -> str:
        """The text still held back, now that the choice has ended for reason; its calls read, where it may make
        some (and its finish reason "tool_calls" if it made any)."""
        piece = self.text.flush()
        reason = "stop" if self.text.stopped else reason
        if self.tool_text is not None:
            piece = self.tool_text.push(piece)
            calls = self.tool_text.calls()
            if calls is None:
                piece += self.tool_text.rest()
            else:
                self.tool_calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {
                    "name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}} for name, arguments in calls]
                reason = "tool_calls" if reason == "stop" else reason
        self.finish_reason = reason
        return piece


class Reply:
    """One completion's answer, its n choices whole or streamed, in the OpenAI shapes (chat or text completion).
    handler: api.py's request handler, which it writes through (send_json, start_reply, wfile) and asks whether
    the client is still there (client_gone)."""

    def __init__(self, handler, choices: list, events: queue.Queue, chat: bool):
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
                yield choice, choice.finish(event)
                continue
            piece = choice.push(event)
            if choice.request.logprobs is not None:
                logprob, top = choice.request.token_logprobs[choice.received_tokens]
                decode = self.handler.server.tokenizer.decode
                choice.new_logprobs.append((decode([event]), logprob, [(decode([id_]), lp) for id_, lp in top]))
            choice.received_tokens += 1
            if choice.text.stopped:  # a stop string: the text ends before it, and so does the choice's request
                choice.request.cancel("stop")
                piece += choice.finish("stop")
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
        texts = {choice: "" for choice in self.choices}
        for choice, piece in self.pieces(watch_client=True):
            texts[choice] += piece
        reasons = {choice.finish_reason for choice in self.choices}
        if "cancelled" in reasons and self.handler.close_connection:
            return  # the client left: nobody to answer
        if "cancelled" in reasons:
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        choices = []
        for index, choice in enumerate(self.choices):
            text = texts[choice]
            if choice.tool_calls:  # no text beside the calls: content null, as OpenAI's API gives it
                answer = {"message": {"role": "assistant", "content": text or None, "tool_calls": choice.tool_calls}}
            else:
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
            if choice.tool_calls and not role:  # the calls come whole, in the choice's last event
                delta["tool_calls"] = [{"index": index, **call} for index, call in enumerate(choice.tool_calls)]
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
