"""A request body of the OpenAI API, checked field by field, into what the engine takes (engine.Request's
arguments): sampling, penalties, log-probabilities, chat messages and structured output. A field that is wrong
is a BadRequest naming it, which api.py answers with its HTTP status; a field this server cannot honour is refused
the same way, never accepted and ignored.
"""
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Optional

import llguidance

from grammar import GrammarError, json_grammar
from sampling import Penalties, Sampling


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


UNSUPPORTED = ("functions", "function_call", "suffix", "echo", "best_of")
MAX_CHOICES = 8  # n: the most answers one request may ask for (each takes a cache row while it runs)


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
    n = field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_CHOICES, f"an integer from 1 to {MAX_CHOICES}")
    return {"n": n, "max_tokens": max_tokens, "seed": field(body, "seed", (int,)), "sampling": sampling,
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
    may also be a list of text parts); an assistant's tool calls, with their arguments as objects (as
    transformers passes them to templates), in which case its content may be null; a tool's answer with the id
    of the call it answers."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "each of 'messages' must be an object with a string 'role'",
                         "messages")
    content, calls = message.get("content"), message.get("tool_calls")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(part.get("text", "")) for part in content)
    if content is None and message["role"] == "assistant" and calls:
        content = ""
    if not isinstance(content, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "each of 'messages' must have a string (or text parts) "
                         "'content' (null only in an assistant message with 'tool_calls')", "messages")
    turn = {"role": message["role"], "content": content}
    if calls is not None and message["role"] == "assistant":
        turn["tool_calls"] = [past_tool_call(call) for call in (calls if isinstance(calls, list) else [None])]
    if message["role"] == "tool" and isinstance(message.get("tool_call_id"), str):
        turn["tool_call_id"] = message["tool_call_id"]
    return turn


def past_tool_call(call) -> dict:
    """A tool call of an earlier assistant message, its arguments (a JSON string in the API) as an object."""
    function = call.get("function") if isinstance(call, dict) else None
    try:
        name, arguments = function["name"], json.loads(function["arguments"])
    except (TypeError, KeyError, ValueError):
        name, arguments = None, None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "each of an assistant message's 'tool_calls' must be "
                         '{"id", "type": "function", "function": {"name", "arguments": a JSON object as a string}}',
                         "messages")
    return {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolUse:
    """What a chat request lets the model do with its tools. functions: their specs ({"name", "description",
    "parameters"}); choice: "auto" (call or answer), "required" (call), or the name of the function to call;
    parallel: whether an answer may make more than one call."""
    functions: list
    choice: str
    parallel: bool


def tools_field(body: dict) -> tuple:
    """(tools, ToolUse): the tools as the chat template takes them (None where none are given) and what the model
    may do with them (None where it may not call them: no tools, or tool_choice "none")."""
    tools = field(body, "tools", (list,), None, lambda v: all(
        isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str) and re.fullmatch(r"[\w-]{1,64}", tool["function"]["name"])
        and isinstance(tool["function"].get("parameters", {}), dict) for tool in v),
        'a list of {"type": "function", "function": {"name": letters, digits, _ or - (up to 64), '
        '"description", "parameters": a JSON schema}}')
    functions = [tool["function"] for tool in tools or []]
    names = [function["name"] for function in functions]
    choice = field(body, "tool_choice", (str, dict), "auto" if tools else "none", lambda v: (
        v in ("none", "auto", "required") if isinstance(v, str) else
        isinstance(v.get("function"), dict) and v["function"].get("name") in names),
        "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": one of the tools}}")
    if choice != "none" and not tools:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "'tool_choice' needs 'tools'", "tool_choice")
    parallel = field(body, "parallel_tool_calls", (bool,), True)
    if choice == "none":
        return tools, None
    return tools, ToolUse(functions, choice if isinstance(choice, str) else choice["function"]["name"], parallel)


def response_format_field(body: dict, vocabulary: Callable[[], llguidance.LLTokenizer]) -> Optional[str]:
    """The grammar that response_format asks the answer to keep to, or None for free text: {"type": "text"},
    {"type": "json_object"} (any JSON object) or {"type": "json_schema", "json_schema": {"name": ..., "schema":
    {...}}} (strict or not, the schema is enforced). vocabulary: the tokenizer's llguidance index, asked for only
    where there is a grammar to check."""
    response_format = field(body, "response_format", (dict,), {"type": "text"})
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "'response_format.type' must be 'text', 'json_object' or "
                         f"'json_schema', not {json.dumps(kind)}", "response_format")
    schema = None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'response_format.json_schema' must be an object whose "
                             "'schema' is a JSON schema object", "response_format")
        schema = spec.get("schema", {})
    try:
        return json_grammar(schema, vocabulary())
    except GrammarError as error:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"response_format's JSON schema cannot be enforced: {error}",
                         "response_format") from None
