"""What the command lines (generate.py, serve.py) share around the generation loop (generation.py): the
flags that say which model runs and how; loading it; the KV cache's rows within a memory budget; the model
with its tokenizer, sampling and steps in one value (Setup); the steps made ready before anything is timed
(warm_up: compiled, or ahead-of-time packages built or loaded, each saying so on stderr); the KV cache's
size; the speed, bandwidth and memory report of a generation; the text streamed as it is decoded; and the
interactive chat."""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import offload
import quantized_kv_cache
import tp
from aot_step import AheadOfTimeDecode
from checkpoint import empty_random_model, load_model, model_bytes, random_model
from cli import (DEFAULT_CHECKPOINT, DTYPES, UsageError, available_memory_bytes, checkpoint_error, parse_size,
                 peak_memory_gb, read_text)
from generation import (Steps, Timing, attended_lengths, cache_bytes_per_slot, cache_rows_within, generate,
                        kv_cache_bytes, weights_bytes)
from model import Transformer
from model_args import ModelArgs
from sampling import Sampling
from tokenizer import StreamDecoder, Tokenizer, load_tokenizer


def model_flags(parser: argparse.ArgumentParser, compile_help: str):
    """The flags of every command line that runs a model: which checkpoint, where, in what dtype, its KV cache."""
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="a converted checkpoint directory or a .safetensors file in one (quantized files too)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--kv_cache", default="float", choices=list(quantized_kv_cache.KV_CACHE_TYPES),
                        help="store the KV cache in the model's dtype, or quantized: int8 or int4 (more rows and "
                             "context in the same memory)")
    parser.add_argument("--compile", action="store_true", help=compile_help)


def load_checkpoint(checkpoint_path, device: str, dtype) -> Transformer:
    """The checkpoint's model (this rank's share of it under torchrun); one clear error for a missing or broken
    checkpoint."""
    try:
        return load_model(checkpoint_path, device, dtype, shard=tp.sharded_loader())
    except (FileNotFoundError, ValueError) as error:
        raise checkpoint_error(error, checkpoint_path) from None


def cache_rows_in_budget(model: Transformer, memory_budget: str, tokens: int, kv_cache: str) -> int:
    """How many rows of KV cache for `tokens` tokens --memory_budget holds; one clear error if not one."""
    fits = cache_rows_within(model, parse_size(memory_budget), tokens)
    if fits < 1:
        raise UsageError(f"--memory_budget {memory_budget} cannot hold one row of KV cache for {tokens} tokens "
                         f"({cache_bytes_per_slot(model) * tokens / 1e6:.1f} MB with --kv_cache {kv_cache}): "
                         "raise it, or quantize the cache (--kv_cache)")
    return fits


def read_prompts(texts: Optional[list], prompt_file: Optional[Path]) -> list:
    """The prompt texts: each --prompt (texts), then each non-blank line of --prompt_file."""
    prompts = list(texts or [])
    if prompt_file:
        lines = [line for line in read_text(prompt_file, "--prompt_file").splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"--prompt_file {prompt_file} holds no prompt: write one prompt per line")
        prompts += lines
    return prompts or ["Once upon a time"]


def encode_prompts(tokenizer: Tokenizer, texts: list, chat: bool, system: Optional[str]) -> list:
    """Token ids of each prompt (through the chat template with --chat). An empty prompt is refused, unless
    the tokenizer starts every text with a BOS token, from which the model can begin."""
    before = [{"role": "system", "content": system}] if system else []
    prompts = [tokenizer.encode(tokenizer.render_chat(before + [{"role": "user", "content": text}]) if chat
                                else text) for text in texts]
    if not all(prompts):
        raise UsageError("--prompt is empty and this tokenizer adds no BOS token to start from: give some text")
    return prompts


def check_vocabulary(prompts: list, name: str):
    """Random weights are read with another model's tokenizer (no text is shown): the prompts' ids must be
    ids of the named shape's vocabulary; the tokenizer's own size does not matter."""
    try:
        vocab_size = ModelArgs.from_name(name).vocab_size
    except ValueError as error:
        raise UsageError(str(error)) from None
    largest = max(max(prompt) for prompt in prompts)
    if largest >= vocab_size:
        raise UsageError(f"the prompt encodes to token id {largest}, outside {name}'s vocabulary of {vocab_size}: "
                         "use plainer text or a --checkpoint_path with a smaller tokenizer")


def checkpoint_tokenizer(checkpoint_path) -> Tokenizer:
    try:
        return load_tokenizer(checkpoint_path)
    except (FileNotFoundError, ValueError) as error:
        raise checkpoint_error(error, checkpoint_path) from None


def random_weights_model(name: str, weights: str, device: str, dtype) -> Transformer:
    """Random weights of a known shape (a speed check), stored as `weights` (checkpoint.RANDOM_WEIGHTS), this
    rank's share of them; refused in one line where they would not fit in memory."""
    try:
        model_args = ModelArgs.from_name(name)
    except ValueError as error:
        raise UsageError(str(error)) from None
    shard = tp.sharded_loader()
    needed, available = model_bytes(empty_random_model(model_args, dtype, shard, weights)), available_memory_bytes()
    if device == "cpu" and needed > available:
        raise UsageError(f"{name} ({weights}, {dtype}) takes {needed / 1e9:.1f} GB, more than the "
                         f"{available / 1e9:.1f} GB of memory available: pick a smaller shape, dtype or "
                         "--random_format")
    return random_model(model_args, device, dtype, shard, weights)


def check_length(model: Transformer, prompt_length: int, max_new_tokens: int):
    context = model.args.max_seq_length
    if prompt_length >= context:
        raise UsageError(f"the prompt has {prompt_length} tokens, longer than the model's context of {context}: "
                         "shorten it")
    if prompt_length + max_new_tokens > context:
        raise UsageError(f"prompt ({prompt_length} tokens) + --max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {context}: lower --max_new_tokens to {context - prompt_length}")


@dataclass
class Setup:
    """What every run of a command line uses: the model and its tokenizer, how to sample, the two steps."""
    model: Transformer
    tokenizer: Tokenizer
    sampling: Sampling
    steps: Steps
    device: str


def compile_announced(compile_run: Callable, ahead_of_time: bool = False):
    """Run compile_run() (a short generation that compiles), saying so before and how long it took after.
    Ahead of time, each package built says so itself (announce_build); loading the others takes milliseconds."""
    if not ahead_of_time:
        print("compiling with torch.compile (about half a minute the first time; later runs reuse Inductor's "
              "cache) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    compile_run()
    print(f"{'decode step ready' if ahead_of_time else 'compiled'} in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)


def announce_build(path: Path):
    print(f"building the decode step ahead of time into {path} (about a minute for SmolLM2; later runs of the "
          "same shapes load it) ...", file=sys.stderr, flush=True)


def warm_up(setup: Setup, prompts: list, max_new_tokens: int = 3):
    """Get the steps ready before anything is timed or streamed. With compiled steps, run a few tokens first,
    so that compiling is not counted as decoding time: from the prompts, then a decode step at each longer
    attended length (one compiled graph each) that max_new_tokens more tokens reach. Those steps write cache
    slots that a generation overwrites before it reads them. With packages that are only loaded, load them."""
    model, longest, decode = setup.model, max(map(len, prompts)), setup.steps.decode
    lengths = attended_lengths(model, longest, max_new_tokens)
    if isinstance(decode, AheadOfTimeDecode) and not decode.build and setup.steps.prefill == Steps().prefill:
        padded = len(set(map(len, prompts))) > 1
        loaded = sum(decode.loader(model, len(prompts), length, padded) is not None for length in lengths)
        if loaded:
            print(f"decode step: {loaded} of the {len(lengths)} packages this run needs are built ahead of time "
                  f"in {decode.cache_dir} (the rest decode eagerly; --aot builds them, --eager ignores them)",
                  file=sys.stderr)
        return
    if setup.steps == Steps():
        return

    def run():
        generate(model, prompts, 3, setup.sampling, steps=setup.steps)
        for length in lengths[1:]:
            # prefill up to slot length - 2, then one decode step whose sequence is length tokens long
            generate(model, prompts, 2, setup.sampling, start_pos=length - longest - 1, steps=setup.steps)
    compile_announced(run, isinstance(decode, AheadOfTimeDecode))


def announce_cache(model: Transformer, kind: str):
    size = cache_bytes_per_slot(model) * model.max_batch_size * model.max_seq_length
    print(f"KV cache ({kind}): {model.max_batch_size} rows x {model.max_seq_length} slots, {size / 1e6:.1f} MB",
          file=sys.stderr)


def report(timing: Timing, model: Transformer, batch: int, device: str, label: str):
    seconds = timing.decode_s or float("nan")
    tokens_per_s, steps_per_s = timing.decoded_tokens / seconds, timing.decode_steps / seconds
    weights = weights_bytes(model)
    kv = kv_cache_bytes(model, batch, timing.attended_slots / max(timing.decode_steps, 1))
    # under torchrun each rank reads its own share of the weights and cache: the figures are rank 0's
    per_rank = f" per rank, {tp.world_size()} ranks" if tp.world_size() > 1 else ""
    memory = " / ".join(f"{gb:.2f}" for gb in tp.gathered(peak_memory_gb(device)))
    print(f"{label}time to first token {timing.prefill_s * 1000:.1f} ms; decode {timing.decoded_tokens} tokens "
          f"in {timing.decode_s:.2f} s: {tokens_per_s:.1f} tokens/s; memory bandwidth "
          f"{(weights + kv) * steps_per_s / 1e9:.1f} GB/s (weights {weights / 1e6:.0f} MB + KV cache "
          f"{kv / 1e6:.0f} MB per step{per_rank}){offload.streamed_bytes(model, timing)}; peak memory {memory} GB",
          file=sys.stderr)


def shown_text(tokenizer: Tokenizer, on_token):
    """on_token, skipping the stop tokens that end a reply (they are markers, not text)."""
    return lambda row, token_id: None if token_id in tokenizer.stop_ids else on_token(row, token_id)


def streaming(tokenizer: Tokenizer):
    """(on_token that prints a reply as it comes, never half a character; finish() that prints the rest)."""
    stream = StreamDecoder(tokenizer)
    on_token = shown_text(tokenizer, lambda row, token_id: print(stream.push(token_id), end="", flush=True))
    return on_token, lambda: print(stream.flush(), flush=True)


def chat_length(model: Transformer, max_seq_length: Optional[int], memory_budget: Optional[str],
                max_new_tokens: int) -> int:
    """The chat's context: max_seq_length (default 2048) or, within a KV cache of at most memory_budget
    ("500MB"), the longest that fits (at most max_seq_length); never past the model's own."""
    if memory_budget is None:
        return min(max_seq_length or 2048, model.args.max_seq_length)
    fits = parse_size(memory_budget) // cache_bytes_per_slot(model)
    length = min(max_seq_length or model.args.max_seq_length, fits)
    if length < 2 + max_new_tokens:
        raise UsageError(f"--memory_budget {memory_budget} holds a KV cache of {length} tokens, too few for "
                         f"--max_new_tokens {max_new_tokens}: raise it, or quantize the cache (--kv_cache)")
    return length


def read_line() -> str:
    try:
        return input("> ")
    except EOFError:
        return ""


def chat(setup: Setup, max_new_tokens: int, system: Optional[str], kv_cache: str):
    """Multi-turn chat on the terminal, in a KV cache already set up (its length bounds the conversation). The
    whole conversation is re-rendered through the chat template each turn, and only the tokens that differ
    from what the KV cache already holds are run through the model."""
    model, tokenizer = setup.model, setup.tokenizer
    announce_cache(model, kv_cache)
    warm_up(setup, [tokenizer.encode("Hello")])
    messages = [{"role": "system", "content": system}] if system else []
    cached = []  # token ids whose keys and values are in the KV cache, in order
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        user_text = tp.on_rank_0(read_line)
        if not user_text.strip():
            break
        messages.append({"role": "user", "content": user_text})
        conversation = tokenizer.encode(tokenizer.render_chat(messages))
        reused = next((i for i, (a, b) in enumerate(zip(cached, conversation)) if a != b),
                      min(len(cached), len(conversation) - 1))
        if len(conversation) + max_new_tokens > model.max_seq_length:
            print(f"the conversation ({len(conversation)} tokens) + --max_new_tokens would pass the "
                  f"{model.max_seq_length}-token context: start a new chat or raise --max_seq_length", file=sys.stderr)
            break
        on_token, finish = streaming(tokenizer)
        [reply], timing = generate(model, [conversation[reused:]], max_new_tokens, setup.sampling,
                                   tokenizer.stop_ids, start_pos=reused, on_token=on_token, steps=setup.steps)
        finish()
        cached = conversation + reply[:-1]  # the last sampled token has not been run through the model yet
        text = tokenizer.decode([t for t in reply if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": text})
        report(timing, model, 1, setup.device, "")
