"""Tool calling (the OpenAI API's `tools` and `tool_choice`) in the format of Hermes-style chat templates, which
Qwen2 and 2.5, Hermes and many fine-tunes use: the template lists the tools' JSON signatures in the system turn,
and the model answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. One parser reads that format (`parse_tool_calls`); where the call is required (tool_choice
"required" or a named function), a grammar (grammar.py) makes the model write one or more such blocks whose JSON
keeps to a tool's parameters, so the call always parses. Where it is only allowed ("auto"), the model writes
what it likes and a block is read as a call if it parses.
"""
import json
import re
from typing import Optional

import llguidance

from grammar import JSON_STYLE, GrammarError
from tokenizer import Tokenizer, unfinished_marker

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
CALL_BLOCK = re.compile(re.escape(CALL_START) + r"\s*(.*?)\s*" + re.escape(CALL_END), re.DOTALL)


def call_schema(tools: list, name: Optional[str] = None) -> dict:
    """The JSON schema of one call's {"name", "arguments"}: of any of the tools, or of the one named.
    tools: OpenAI's function specs ({"name", "description", "parameters"})."""
    calls = [{"type": "object", "properties": {"name": {"const": tool["name"]},
                                               "arguments": tool.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False}
             for tool in tools if name is None or tool["name"] == name]
    return {"anyOf": calls, "x-guidance": JSON_STYLE}


def tool_call_grammar(tools: list, tokenizer: Tokenizer, vocabulary: llguidance.LLTokenizer,
                      name: Optional[str] = None, parallel: bool = True) -> str:
    """The grammar of one call block (one or more, if parallel), of the named tool only where one is named, in
    llguidance's Lark. Where the vocabulary has <tool_call> as a token of its own, the grammar asks for that
    token. GrammarError where llguidance cannot take a tool's parameters."""
    start, end = (f"<[{tokenizer.special_tokens[marker]}]>" if marker in tokenizer.special_tokens
                  else json.dumps(marker) for marker in (CALL_START, CALL_END))
    more_calls = ' ("\\n" call)*' if parallel else ""
    lark = (f'start: call{more_calls}\ncall: {start} "\\n" arguments "\\n" {end}\n'
            f"arguments: %json {json.dumps(call_schema(tools, name))}\n")
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary)
    if error:
        raise GrammarError(error)
    return grammar


def parse_tool_calls(text: str) -> Optional[list]:
    """The calls written in text, as (name, arguments) pairs, or None where it has none or a block that does not
    parse as a call (then the text is an answer, not a call)."""
    blocks = CALL_BLOCK.findall(text)
    if not blocks or CALL_BLOCK.sub("", text).strip():
        return None
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(
                call.get("arguments"), dict):
            return None
        calls.append((call["name"], call["arguments"]))
    return calls


class ToolCallText:
    """An answer's text as it streams, where the model may call tools: what comes before the first <tool_call>
    is shown as it comes (held back only while it may be the marker's start); from the marker on, it is kept,
    and read as calls when the answer ends."""

    def __init__(self):
        self.pending, self.calls_text = "", None

    def push(self, text: str) -> str:
        """What of the text so far can be shown now."""
        if self.calls_text is not None:
            self.calls_text += text
            return ""
        text = self.pending + text
        if CALL_START in text:
            at = text.index(CALL_START)
            self.pending, self.calls_text = "", text[at:]
            return text[:at]
        held = unfinished_marker(text, [CALL_START])
        self.pending = text[len(text) - held:]
        return text[:len(text) - held]

    def calls(self) -> Optional[list]:
        """At the end of the answer: its calls, or None where it made none that parse."""
        return None if self.calls_text is None else parse_tool_calls(self.calls_text)

    def rest(self) -> str:
        """At the end of an answer that made no call: the text still held back."""
        text, self.pending = self.pending + (self.calls_text or ""), ""
        self.calls_text = None
        return text
