"""What a run of the command lines does around the generation loop (generation.py): the model with its
tokenizer, sampling and steps in one value (Setup); the steps made ready before anything is timed (warm_up:
compiled, or ahead-of-time packages built or loaded, each saying so on stderr); the KV cache's size; the
speed, bandwidth and memory report of a generation; and the text streamed as it is decoded."""
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import offload
import tp
from aot_step import AheadOfTimeDecode
from cli import peak_memory_gb
from generation import Steps, Timing, attended_lengths, cache_bytes_per_slot, generate, kv_cache_bytes, weights_bytes
from model import Transformer
from sampling import Sampling
from tokenizer import StreamDecoder, Tokenizer


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
