"""Structured output: answers that keep to a grammar (any JSON object, or the JSON a JSON schema allows),
through llguidance (guidance-ai's grammar engine: an Earley parser over the tokenizer's token bytes, fast enough
to compute the whole vocabulary's mask at every step, and with no dependencies of its own).

Before each token the engine sets the logits of every token that the grammar does not allow there to -inf
(`Constraint.mask`), samples as usual, then moves the grammar past the token it took (`Constraint.advance`).
Once the grammar is complete, only the end-of-text tokens are allowed, so the answer ends there; max_tokens may
still cut it first (the API then says finish_reason "length", as OpenAI's does).
"""
from typing import Optional

import llguidance
import torch
from torch import Tensor

from tokenizer import Tokenizer

# JSON as people write it on one line: ", " and ": " between items and no other whitespace outside strings
# (a model left free to add whitespace can spend its tokens on newlines)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar (a JSON schema) that llguidance cannot take, and why."""


class Vocabulary:
    """What llguidance needs to know of a tokenizer (its TokenizerWrapper's fields): the bytes of each token id,
    special tokens marked by a leading 0xFF byte (which no UTF-8 text has, so the grammar never matches one as
    text), and how text is encoded."""

    def __init__(self, tokenizer: Tokenizer):
        special = set(tokenizer.special_tokens.values())
        self.tokens = [b"\xff" + piece if id_ in special else piece
                       for id_, piece in enumerate(tokenizer.token_bytes())]
        self.special_token_ids = sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.encode = tokenizer.encode

    def __call__(self, text: str) -> list:
        return self.encode(text, bos=False)


def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for this one, whose end-of-text tokens are all of tokenizer.stop_ids. It indexes
    the whole vocabulary: build it once, and share it between requests."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary(tokenizer)), eos_token=tokenizer.stop_ids)


def json_grammar(schema: Optional[dict], vocabulary: llguidance.LLTokenizer) -> str:
    """The grammar of the JSON that schema allows, or of any JSON object where schema is None. GrammarError
    where llguidance cannot take the schema (an unknown type, a keyword it does not implement, ...)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"} if schema is None else schema,
                                                                defaults=JSON_STYLE)
    except ValueError as error:
        raise GrammarError(str(error)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary)
    if error:
        raise GrammarError(error)
    return grammar


class Constraint:
    """One answer's place in its grammar: which tokens may come next (mask), and the grammar moved past each
    token taken (advance)."""

    def __init__(self, vocabulary: llguidance.LLTokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        self.vocab_size = vocabulary.vocab_size

    def mask(self, logits: Tensor) -> Tensor:
        """(1, vocab) logits with -inf for each token the grammar does not allow next (a model whose vocabulary
        is padded past the tokenizer's has those ids disallowed too)."""
        # one byte per token id: 0 where the token is not allowed
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        allowed = torch.nn.functional.pad(allowed, (0, logits.size(-1) - self.vocab_size))
        return logits.masked_fill(~allowed.to(logits.device), -float("inf"))

    def advance(self, token: int):
        """The grammar moved past the token taken, which mask allowed."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
