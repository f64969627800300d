"""Structured output (grammar.py through the server): SmolLM2's answers keep to JSON schemas, checked by the
`jsonschema` package, through the official openai client; an answer cut short says "length"; the mask allows
exactly the tokens that continue the grammar."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import client, running_server
from grammar import Constraint, grammar_tokenizer, json_grammar
from scripts.bench_grammar import SCHEMAS
from tokenizer import load_tokenizer

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("openai")


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    yield from running_server(smollm2_dir, slots=8)


def ask(http_server, question: str, response_format: dict, **options):
    return client(http_server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": question + " Answer in JSON."}],
        response_format=response_format, **options)


def test_every_answer_keeps_to_its_schema_at_temperature_0_8(smollm2_server):
    http_server = smollm2_server[0]

    def answer(index: int):
        question, schema = SCHEMAS[index]
        response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        return ask(http_server, question, response_format, temperature=0.8, seed=index, max_tokens=400).choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(answer, range(len(SCHEMAS))))
    for (question, schema), choice in zip(SCHEMAS, choices):
        assert choice.finish_reason == "stop", question
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_asks_for_any_object(smollm2_server):
    choice = ask(smollm2_server[0], "Give a person with a name and an age.", {"type": "json_object"}, temperature=0,
                 max_tokens=200).choices[0]
    assert choice.finish_reason == "stop"
    assert json.loads(choice.message.content) == {"name": "John", "age": 25}


def test_text_format_is_the_free_answer(smollm2_server):
    free, text = (ask(smollm2_server[0], "Say hi.", response_format, temperature=0, max_tokens=20)
                  for response_format in (None, {"type": "text"}))
    assert text.choices[0].message.content == free.choices[0].message.content


def test_an_answer_cut_by_max_tokens_says_length(smollm2_server):
    choice = ask(smollm2_server[0], "Describe a book.", {"type": "json_object"}, temperature=0, max_tokens=3).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith("{")
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


def test_the_mask_allows_exactly_the_tokens_that_continue_the_grammar(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    vocabulary = grammar_tokenizer(tokenizer)
    constraint = Constraint(vocabulary, json_grammar({"enum": ["yes", "no"]}, vocabulary))
    logits = torch.zeros(1, tokenizer.vocab_size)
    allowed = (constraint.mask(logits)[0] == 0).nonzero().flatten().tolist()
    assert allowed and all('"yes"'.startswith(tokenizer.decode([id_])) or '"no"'.startswith(tokenizer.decode([id_]))
                           for id_ in allowed)
    assert tokenizer.encode('"yes"')[0] in allowed
    for token in tokenizer.encode('"yes"'):
        constraint.advance(token)
    assert (constraint.mask(logits)[0] == 0).nonzero().flatten().tolist() == tokenizer.stop_ids


def test_a_token_the_grammar_does_not_allow_is_refused(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    vocabulary = grammar_tokenizer(tokenizer)
    constraint = Constraint(vocabulary, json_grammar(None, vocabulary))
    with pytest.raises(ValueError, match="breaks the grammar"):
        constraint.advance(tokenizer.encode("hello")[0])
