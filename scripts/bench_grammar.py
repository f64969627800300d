"""What structured output costs per token: the grammar's mask and step (grammar.py, llguidance) against the
decode step they sit beside, on the answers SmolLM2 writes to 20 JSON schemas (nested objects, enums, arrays with
bounds, numbers, optional fields, references, anyOf). The serving issue's target: the mask at most 15% of a step.

Each answer is generated as the engine makes it (temperature 0.8, one cache row, eager): a decode step, the
mask, sampling, the grammar moved past the token. The same step over 8 rows (8 requests, 8 masks) is timed too.
Every answer is parsed and checked against its schema with the `jsonschema` package; any that fails is printed.

    python scripts/bench_grammar.py                   # the default Q4_1 file
    python scripts/bench_grammar.py --seeds 3 --json grammar.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_model, stored_weights  # noqa: E402
from cli import DEFAULT_CHECKPOINT  # noqa: E402
from engine import ModelRunner  # noqa: E402
from generation import slots_to_attend  # noqa: E402
from grammar import Constraint, grammar_tokenizer, json_grammar  # noqa: E402
from prepare import activation_dtype, prepare  # noqa: E402
from runtime import checkpoint_tokenizer  # noqa: E402
from sampling import Sampling, sample  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "role": {"type": "string", "maxLength": 40}},
          "required": ["name", "role"], "additionalProperties": False}


def closed(properties: dict, required: list) -> dict:
    """An object schema with these properties, the required ones listed, no others allowed."""
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


# (what the user asks, the schema its answer keeps to)
SCHEMAS = [
    ("Describe a person named Alice who is 30 years old.",
     closed({"name": {"type": "string"}, "age": {"type": "integer"}}, ["name", "age"])),
    ("Give the weather in Paris today.",
     closed({"city": {"type": "string"}, "temperature_c": {"type": "number"},
             "sky": {"enum": ["sunny", "cloudy", "rainy", "snowy"]}}, ["city", "temperature_c", "sky"])),
    ("List three fruits.",
     closed({"fruits": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}}, ["fruits"])),
    ("Is the sky blue? Answer with a boolean and a reason.",
     closed({"answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 80}}, ["answer", "reason"])),
    ("Describe a book with its author.",
     closed({"title": {"type": "string"},
             "author": closed({"first": {"type": "string"}, "last": {"type": "string"}}, ["first", "last"]),
             "year": {"type": "integer", "minimum": 1000, "maximum": 2030}}, ["title", "author", "year"])),
    ("Rate this movie from 1 to 5: a long film about a dog.",
     closed({"rating": {"type": "integer", "minimum": 1, "maximum": 5}}, ["rating"])),
    ("Give a color in hex.", closed({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}, ["hex"])),
    ("Make a shopping list with quantities.",
     closed({"items": {"type": "array", "minItems": 1, "maxItems": 5, "items": closed(
         {"name": {"type": "string", "maxLength": 30}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
         ["name", "quantity"])}}, ["items"])),
    ("Describe a city, with its population if you know it.",
     closed({"name": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
             "population": {"type": "integer", "minimum": 0}}, ["name", "country"])),
    ("Classify the sentiment of: 'I love this phone'.",
     closed({"sentiment": {"enum": ["positive", "negative", "neutral"]},
             "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, ["sentiment", "confidence"])),
    ("Give the coordinates of a point.", {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}),
    ("Name an animal.", {"type": "string", "maxLength": 40}),
    ("Write a short todo item.",
     closed({"task": {"type": "string", "maxLength": 60}, "done": {"type": "boolean"},
             "priority": {"enum": ["low", "medium", "high"]},
             "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
            ["task", "done", "priority"])),
    ("Describe an employee and their manager.",
     {**closed({"employee": {"$ref": "#/$defs/person"}, "manager": {"$ref": "#/$defs/person"}},
               ["employee", "manager"]), "$defs": {"person": PERSON}}),
    ("Give a date.",
     closed({"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
             "month": {"type": "integer", "minimum": 1, "maximum": 12},
             "day": {"type": "integer", "minimum": 1, "maximum": 31}}, ["year", "month", "day"])),
    ("Pick a shape and give its size.",
     {"anyOf": [closed({"shape": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}, ["shape", "radius"]),
                closed({"shape": {"const": "square"}, "side": {"type": "number", "minimum": 0}}, ["shape", "side"])]}),
    ("Give a product with its price.",
     closed({"product": {"type": "string", "maxLength": 40}, "price": {"type": "number", "minimum": 0},
             "currency": {"enum": ["USD", "EUR", "GBP"]}, "in_stock": {"type": "boolean"}},
            ["product", "price", "currency"])),
    ("Write a tiny matrix of numbers.",
     {"type": "array", "minItems": 2, "maxItems": 3,
      "items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer"}}}),
    ("Describe a recipe.",
     closed({"name": {"type": "string", "maxLength": 40},
             "ingredients": {"type": "array", "minItems": 2, "maxItems": 6,
                             "items": {"type": "string", "maxLength": 30}},
             "minutes": {"type": "integer", "minimum": 1, "maximum": 600}, "vegetarian": {"type": "boolean"}},
            ["name", "ingredients", "minutes"])),
    ("Answer yes or no, with nothing else.", {"enum": ["yes", "no"]}),
]


def chat_prompt(tokenizer, question: str) -> list:
    return tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": question + " Answer in JSON."}]))


def constrained_answer(runner, tokenizer, vocabulary, question: str, schema: dict, seed: int, max_tokens: int):
    """(answer text, seconds of each decode step, seconds of each mask and grammar step, sampling left out) for
    one schema."""
    constraint = Constraint(vocabulary, json_grammar(schema, vocabulary))
    prompt, generator = chat_prompt(tokenizer, question), torch.Generator().manual_seed(seed)
    sampling = Sampling(temperature=0.8)
    logits = runner.prefill(0, prompt, 0, slots_to_attend(len(prompt), runner.max_seq_length))
    answer, step_seconds, grammar_seconds = [], [], []
    while len(answer) < max_tokens:
        started = time.perf_counter()
        masked = constraint.mask(logits)
        masked_at = time.perf_counter()
        token = sample(masked, sampling, generator).item()
        sampled_at = time.perf_counter()
        constraint.advance(token)
        grammar_seconds.append(masked_at - started + time.perf_counter() - sampled_at)
        if token in tokenizer.stop_ids:
            break
        answer.append(token)
        position = len(prompt) + len(answer) - 1
        started = time.perf_counter()
        logits = runner.decode_rows([token], [position], slots_to_attend(position + 1, runner.max_seq_length))
        step_seconds.append(time.perf_counter() - started)
    return tokenizer.decode(answer), step_seconds, grammar_seconds


def step_over_rows(runner, rows: int, position: int, repeats: int = 20) -> float:
    """Median seconds of one decode step over `rows` rows at cache slot `position`."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.decode_rows([0] * rows, [position] * rows, slots_to_attend(position + 1, runner.max_seq_length))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--seeds", type=int, default=1, help="answers per schema (seeds 0, 1, ...)")
    parser.add_argument("--max_tokens", type=int, default=400)
    parser.add_argument("--schemas", type=int, default=len(SCHEMAS), help="the first this many schemas only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    dtype = activation_dtype("auto", "cpu", "eager", stored_weights(args.checkpoint_path))
    model = prepare(load_model(args.checkpoint_path, "cpu", dtype), "cpu")
    tokenizer = checkpoint_tokenizer(args.checkpoint_path)
    started = time.perf_counter()
    vocabulary = grammar_tokenizer(tokenizer)
    index_seconds = time.perf_counter() - started
    runner = ModelRunner(model, rows=8, max_seq_length=1024)
    with torch.no_grad():
        steps, masks, failures, tokens = [], [], [], 0
        for seed in range(args.seeds):
            for question, schema in SCHEMAS[:args.schemas]:
                text, step_seconds, grammar_seconds = constrained_answer(runner, tokenizer, vocabulary, question,
                                                                         schema, seed, args.max_tokens)
                steps, masks, tokens = steps + step_seconds, masks + grammar_seconds, tokens + len(step_seconds)
                try:
                    jsonschema.validate(json.loads(text), schema)
                except (ValueError, jsonschema.ValidationError) as error:
                    failures.append((question, text, str(error).splitlines()[0]))
        eight_rows = step_over_rows(runner, 8, 60)
    step, mask = statistics.median(steps), statistics.median(masks)
    answers = args.seeds * len(SCHEMAS[:args.schemas])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.checkpoint_path}; "
          f"the vocabulary's grammar index built in {index_seconds * 1000:.0f} ms", file=sys.stderr)
    print(f"{answers - len(failures)} of {answers} answers parse and validate ({tokens} tokens)")
    for question, text, error in failures:
        print(f"  FAILED {question!r}: {text!r} ({error})")
    step_mean, mask_mean = statistics.mean(steps), statistics.mean(masks)
    print("| per token | median ms | mean ms | against one row's step (means) |")
    print("| --- | --- | --- | --- |")
    print(f"| decode step, one row | {step * 1000:.2f} | {step_mean * 1000:.2f} | 1.00 |")
    print(f"| mask and grammar step | {mask * 1000:.3f} | {mask_mean * 1000:.3f} | {mask_mean / step_mean:.3f} |")
    print(f"| decode step, 8 rows | {eight_rows * 1000:.2f} | | 8 masks: {8 * mask_mean / eight_rows:.3f} of it |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint_path), "answers": answers,
                                         "failures": failures, "step_s": steps, "mask_s": masks,
                                         "eight_rows_step_s": eight_rows, "torch": torch.__version__}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
