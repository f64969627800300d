"""Generate text with a brisk checkpoint: the command line.

    python generate.py --prompt "Once upon a time"            # complete a text
    python generate.py --chat --prompt "What is gravity?"     # one turn through the chat template
    python generate.py --interactive                          # multi-turn chat

Generated text goes to stdout as it is produced; timings and speed go to stderr. The loop itself is
generation.py, what a run does around it (loading, warm-up, reports, streamed text, the chat) runtime.py,
and speculative decoding speculative.py; this file reads the flags, loads the model (whole, sharded over
torchrun's processes by tp.py, or streamed by offload.py) and runs the prompts or the chat.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import offload
import quantized_kv_cache
import tp
from aot_step import AheadOfTimeDecode, default_cache_dir
from checkpoint import RANDOM_WEIGHTS, stored_weights
from cli import UsageError, fail, parse_size, pick_device
from generation import Steps, compile_steps, generate, slots_to_attend
from model import Transformer
from prepare import activation_dtype, prepare
from runtime import (Setup, announce_build, announce_cache, cache_rows_in_budget, chat, chat_length, check_length,
                     check_vocabulary, checkpoint_tokenizer, encode_prompts, load_checkpoint, model_flags,
                     random_weights_model, read_prompts, report, streaming, warm_up)
from sampling import Sampling
from speculative import (check_speculative_flags, compiled_verify_forward, draft_model, run_speculative,
                         speculative_flags)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts")
    parser.add_argument("--prompt_file", type=Path, help="a file of prompts, one per line, run as one batch")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat on the terminal")
    parser.add_argument("--system", help="system prompt for --chat and --interactive")
    parser.add_argument("--num_samples", type=int, default=1, help="generate this many times (timings averaged)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--top_p", type=float, help="nucleus sampling: keep tokens covering this probability")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    model_flags(parser, "compile the decode step with torch.compile")
    parser.add_argument("--random_weights", metavar="NAME",
                        help="speed check only: random weights of a known shape (e.g. Llama-2-7B); "
                             "the checkpoint's tokenizer encodes the prompt, and no text is printed")
    parser.add_argument("--random_format", default="float", choices=RANDOM_WEIGHTS,
                        help="--random_weights: store the linear layers (output head too) as floats, int8 or int4 "
                             "in groups of N, as quantize.py's files do")
    parser.add_argument("--max_seq_length", type=int, help="KV cache length for --interactive (default 2048)")
    parser.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                        help="models larger than memory: keep the blocks on disk or in host memory and stream "
                             "each to the device as it runs (see offload.py)")
    parser.add_argument("--memory_budget", help="memory the KV cache may take, e.g. 150MB or 2GB: the largest "
                        "--batch_size (--interactive: context) that fits is used; with --offload, memory the weights "
                        "may take instead (with disk on a CPU: the whole process), blocks beyond it streaming")
    parser.add_argument("--batch_size", type=int, help="with --prompt_file: prompts generated together "
                        "(default: all of them)")
    parser.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
    parser.add_argument("--aot", action="store_true", help="CPU: decode through a step compiled ahead of time "
                        "(AOTInductor), faster than --compile; built once per batch size and context length "
                        "(about a minute for SmolLM2) and kept in $BRISK_CACHE_DIR (default ~/.cache/brisk). "
                        "Without --aot, a CPU decodes through such a package wherever one is already built")
    parser.add_argument("--eager", action="store_true", help="CPU: decode eagerly even where a package built by "
                        "--aot would serve")
    parser.add_argument("--profile", type=Path, help="write a Chrome trace of the last sample to this path")
    speculative_flags(parser)
    return parser.parse_args(argv)


def check_args(args):
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top_k must be >= 1, got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise UsageError(f"--max_seq_length must be >= 2, got {args.max_seq_length}")
    if args.interactive and (args.prompt is not None or args.prompt_file):
        raise UsageError("--interactive reads prompts from the terminal: drop --prompt / --prompt_file")
    if args.random_format != "float" and not args.random_weights:
        raise UsageError("--random_format stores random weights: add --random_weights NAME")
    if args.interactive and args.random_weights:
        raise UsageError("--random_weights produces no text to chat with: drop --interactive")
    if args.offload != "none" and (args.compile or args.compile_prefill or args.aot or tp.world_size() > 1):
        raise UsageError("--offload streams blocks eagerly in one process: drop --compile / --aot / torchrun")
    if args.aot and args.eager:
        raise UsageError("--aot decodes through a compiled package, --eager without one: pick one")
    if args.aot and (args.compile or args.speculative or tp.world_size() > 1):
        raise UsageError("--aot compiles the plain decode step of one process: drop --compile / --speculative / "
                         "torchrun")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.profile and not args.profile.parent.is_dir():
        raise UsageError(f"--profile {args.profile}: there is no directory {args.profile.parent}")
    check_speculative_flags(args)


def load(args, device: str, dtype: torch.dtype) -> Transformer:
    """The model: random weights of a known shape, streamed blocks, or a checkpoint, whole or this rank's
    share of it; one clear error for a missing or broken checkpoint."""
    if args.random_weights:
        return random_weights_model(args.random_weights, args.random_format, device, dtype)
    if args.offload != "none":
        try:
            budget = parse_size(args.memory_budget) if args.memory_budget else None
            return offload.load_offloaded(args.checkpoint_path, device, dtype, args.offload, budget)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
    return load_checkpoint(args.checkpoint_path, device, dtype)


def uses_packages(args, device: str) -> bool:
    """Whether decoding goes through ahead-of-time packages (aot_step.py): with --aot, built where missing;
    otherwise on a CPU, those already built, whenever the decode step would be the plain eager one."""
    plain_eager = not (args.compile or args.speculative or args.eager or args.offload != "none"
                       or tp.world_size() > 1)
    return args.aot or (device == "cpu" and plain_eager)


def cache_budget(args):
    """--memory_budget where it budgets the KV cache (without --offload, where it budgets the weights); else None."""
    return args.memory_budget if args.offload == "none" else None


def run_prompts(args, setup: Setup, texts: list, prompts: list):
    """Each prompt (texts, and their token ids) continued, or answered with --chat, --num_samples times, in
    batches of --batch_size."""
    check_length(setup.model, max(map(len, prompts)), args.max_new_tokens)
    if args.speculative and len(prompts) > 1:
        raise UsageError("--speculative runs one prompt at a time: pass a single --prompt")
    batch_size = min(args.batch_size or len(prompts), len(prompts))
    cache_length = max(map(len, prompts)) + args.max_new_tokens
    budget = cache_budget(args)
    # A package is built for one cache shape: round it up, so that other prompt lengths reuse it (not under a
    # memory budget, unless --aot asks for a package: rounding up changes what fits)
    if args.aot or (isinstance(setup.steps.decode, AheadOfTimeDecode) and budget is None):
        cache_length = slots_to_attend(cache_length, setup.model.args.max_seq_length)
    if budget is not None:
        batch_size = min(batch_size, cache_rows_in_budget(setup.model, budget, cache_length, args.kv_cache))
    setup.model.setup_caches(batch_size, cache_length)
    draft = (draft_model(args.draft_checkpoint_path, setup, args.dtype, args.kv_cache)
             if args.speculative == "draft" else None)
    announce_cache(setup.model, args.kv_cache)
    verify_forward = (compiled_verify_forward(args.speculative, setup.device)  # --compile: the verify pass
                      if args.speculative and args.compile else None)
    if not args.speculative:
        warm_up(setup, prompts[:batch_size], args.max_new_tokens)
    for sample_index in range(args.num_samples):
        profiling = args.profile and sample_index == args.num_samples - 1
        with torch.profiler.profile() if profiling else contextlib.nullcontext() as profiler:
            if args.speculative:
                if not args.chat:
                    print(texts[0], end="", flush=True)
                run_speculative(setup, args.speculative, prompts[0], args.max_new_tokens, args.speculate_k,
                                args.lookahead_window, draft, verify_forward)
            else:
                label = f"sample {sample_index + 1}: " if args.num_samples > 1 else ""
                for start in range(0, len(prompts), batch_size):
                    rows = slice(start, min(start + batch_size, len(prompts)))
                    which = "" if batch_size == len(prompts) else f"prompts {rows.start + 1}-{rows.stop}: "
                    run_batch(args, setup, texts[rows], prompts[rows], label + which, stream=len(prompts) == 1)
        if profiling:
            profiler.export_chrome_trace(str(args.profile))
            print(f"wrote a Chrome trace to {args.profile}", file=sys.stderr)


def run_batch(args, setup: Setup, texts: list, prompts: list, label: str, stream: bool):
    """One batch of prompts; stream: print the text of a run's single prompt as it comes (a batch's is
    printed at the end)."""
    stream = stream and not args.random_weights
    on_token, finish = streaming(setup.tokenizer) if stream else (None, None)
    if stream and not args.chat:
        print(texts[0], end="", flush=True)
    outputs, timing = generate(setup.model, prompts, args.max_new_tokens, setup.sampling, setup.tokenizer.stop_ids,
                               on_token=on_token, steps=setup.steps)
    if stream:
        finish()
    elif not args.random_weights:
        for text, output in zip(texts, outputs):
            shown = [token_id for token_id in output if token_id not in setup.tokenizer.stop_ids]
            print(("" if args.chat else text) + setup.tokenizer.decode(shown), end="\n\n", flush=True)
    report(timing, setup.model, len(prompts), setup.device, label)


def interactive(args, setup: Setup):
    """The chat (runtime.chat) in a KV cache of --max_seq_length tokens (default 2048), or with --memory_budget
    of the longest context that fits."""
    budget = cache_budget(args)
    setup.model.setup_caches(1, chat_length(setup.model, args.max_seq_length, budget, args.max_new_tokens))
    chat(setup, args.max_new_tokens, args.system, args.kv_cache)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        device = pick_device(args.device)
        if args.aot and device != "cpu":
            raise UsageError(f"--aot builds a CPU decode step: on {device} use --compile (CUDA graphs on CUDA)")
        weights = args.random_format.split("-")[0] if args.random_weights else stored_weights(args.checkpoint_path)
        packages = uses_packages(args, device)
        step = "aot" if packages else "compiled" if args.compile else "eager"
        dtype = activation_dtype(args.dtype, device, step, weights)
        tp.init(device)
        tp.quiet_other_ranks()  # every rank generates the same text; rank 0 shows it
        seed = tp.common_seed(args.seed)
        if seed is not None:
            torch.manual_seed(seed)
        texts = None if args.interactive else read_prompts(args.prompt, args.prompt_file)
        tokenizer = checkpoint_tokenizer(args.checkpoint_path)
        prompts = None if args.interactive else encode_prompts(tokenizer, texts, args.chat, args.system)
        if args.random_weights:
            check_vocabulary(prompts, args.random_weights)
        started = time.perf_counter()
        model = prepare(quantized_kv_cache.use(load(args, device, dtype), args.kv_cache), device, step)
        print(f"loaded {args.random_weights or args.checkpoint_path} ({dtype}, {device}) in "
              f"{time.perf_counter() - started:.2f} s", file=sys.stderr)
        steps = compile_steps(device, args.compile and not args.speculative, args.compile_prefill)
        if packages:
            steps = Steps(steps.prefill, AheadOfTimeDecode(default_cache_dir(), args.aot, announce_build))
        setup = Setup(model, tokenizer, Sampling(args.temperature, args.top_k, args.top_p), steps, device)
        if args.interactive:
            interactive(args, setup)
        else:
            run_prompts(args, setup, texts, prompts)
    except UsageError as error:
        return fail(str(error))
    finally:
        tp.finish()
    return 0


if __name__ == "__main__":
    tp.leave(main())
