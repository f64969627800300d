"""Generate text with a brisk checkpoint: the command line.

    python generate.py --prompt "Once upon a time"            # complete a text
    python generate.py --chat --prompt "What is gravity?"     # one turn through the chat template
    python generate.py --interactive                          # multi-turn chat

Generated text goes to stdout as it is produced; timings and speed go to stderr. The loop itself is
generation.py, and what a run does around it (warm-up, reports, streamed text) runtime.py; this file reads
the flags, loads the model (whole, sharded over torchrun's processes by tp.py, or streamed by offload.py),
and runs prompts, a chat, or speculative decoding (speculative.py).
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

import cpu_kernels
import offload
import quantized_kv_cache
import tp
from aot_step import AheadOfTimeDecode, default_cache_dir
from checkpoint import RANDOM_WEIGHTS, empty_random_model, load_model, model_bytes, random_model, stored_weights
from cli import (DEFAULT_CHECKPOINT, DTYPES, UsageError, available_memory_bytes, checkpoint_error, fail,
                 parse_size, pick_device, pick_dtype, read_text)
from generation import (Steps, cache_bytes_per_slot, cache_rows_within, compile_step, compile_steps, generate,
                        slots_to_attend)
from model import ModelArgs, Transformer
from runtime import Setup, announce_build, announce_cache, compile_announced, report, streaming, warm_up
from sampling import Sampling
from speculative import (DraftModel, lookahead_generate, lookahead_logits, lookahead_rows, load_draft,
                         speculative_generate, target_logits)
from tokenizer import Tokenizer, load_tokenizer


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
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="a converted checkpoint directory or its .safetensors file")
    parser.add_argument("--random_weights", metavar="NAME",
                        help="speed check only: random weights of a known shape (e.g. Llama-2-7B); "
                             "the checkpoint's tokenizer encodes the prompt, and no text is printed")
    parser.add_argument("--random_format", default="float", choices=RANDOM_WEIGHTS,
                        help="--random_weights: store the linear layers (output head too) as floats, int8 or int4 "
                             "in groups of N, as quantize.py's files do")
    parser.add_argument("--max_seq_length", type=int, help="KV cache length for --interactive (default 2048)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                        help="models larger than memory: keep the blocks on disk or in host memory and stream "
                             "each to the device as it runs (see offload.py)")
    parser.add_argument("--memory_budget", help="memory the KV cache may take, e.g. 150MB or 2GB: the largest "
                        "--batch_size (--interactive: context) that fits is used; with --offload, memory the weights "
                        "may take instead (with disk on a CPU: the whole process), blocks beyond it streaming")
    parser.add_argument("--kv_cache", default="float", choices=list(quantized_kv_cache.KV_CACHE_TYPES),
                        help="store the KV cache in the model's dtype, or quantized: int8 or int4 (more batch and "
                             "context in the same memory)")
    parser.add_argument("--batch_size", type=int, help="with --prompt_file: prompts generated together "
                        "(default: all of them)")
    parser.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    parser.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
    parser.add_argument("--aot", action="store_true", help="CPU: decode through a step compiled ahead of time "
                        "(AOTInductor), faster than --compile; built once per batch size and context length "
                        "(about a minute for SmolLM2) and kept in $BRISK_CACHE_DIR (default ~/.cache/brisk). "
                        "Without --aot, a CPU decodes through such a package wherever one is already built")
    parser.add_argument("--eager", action="store_true", help="CPU: decode eagerly even where a package built by "
                        "--aot would serve")
    parser.add_argument("--profile", type=Path, help="write a Chrome trace of the last sample to this path")
    parser.add_argument("--speculative", choices=["draft", "prompt_lookup", "lookahead"],
                        help="speculative decoding (one prompt): guesses from a draft model, from the prompt, or "
                             "from the model's own Jacobi iterations (lookahead; greedy)")
    parser.add_argument("--draft_checkpoint_path", type=Path, help="--speculative draft: a smaller model with "
                        "the same tokenizer, or a quantized file of the target")
    parser.add_argument("--speculate_k", type=int, default=5, help="guesses the target checks per forward pass "
                        "(lookahead: the n-gram length less one)")
    parser.add_argument("--lookahead_window", type=int, default=5, help="--speculative lookahead: Jacobi columns "
                        "and n-grams verified per pass")
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
    if args.speculative == "draft" and args.draft_checkpoint_path is None:
        raise UsageError("--speculative draft needs --draft_checkpoint_path")
    if args.speculative == "lookahead" and (args.temperature != 0 or args.lookahead_window < 1):
        raise UsageError("--speculative lookahead decodes greedily: add --temperature 0 (and --lookahead_window >= 1)")
    if args.speculative and (args.interactive or args.random_weights or args.speculate_k < 1):
        raise UsageError("--speculative needs --speculate_k >= 1 and a prompt (not --interactive / --random_weights)")
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


def read_prompts(args) -> list:
    """The prompt texts: each --prompt, then each non-blank line of --prompt_file."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        lines = [line for line in read_text(args.prompt_file, "--prompt_file").splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"--prompt_file {args.prompt_file} holds no prompt: write one prompt per line")
        prompts += lines
    return prompts or ["Once upon a time"]


def encode_prompts(args, tokenizer: Tokenizer, texts: list) -> list:
    """Token ids of each prompt (through the chat template with --chat). An empty prompt is refused, unless
    the tokenizer starts every text with a BOS token, from which the model can begin."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [tokenizer.encode(tokenizer.render_chat(system + [{"role": "user", "content": text}]) if args.chat
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


def checkpoint_tokenizer(args) -> Tokenizer:
    try:
        return load_tokenizer(args.checkpoint_path)
    except (FileNotFoundError, ValueError) as error:
        raise checkpoint_error(error, args.checkpoint_path) from None


def load(args, device: str, dtype: torch.dtype, tokenizer: Tokenizer) -> Transformer:
    """The model: random weights of a known shape, streamed blocks, or a checkpoint, whole or this rank's
    share of it; one clear error for a missing or broken checkpoint."""
    try:
        if args.random_weights:
            model_args = ModelArgs.from_name(args.random_weights)
            shard = tp.sharded_loader()
            needed = model_bytes(empty_random_model(model_args, dtype, shard, args.random_format))
            available = available_memory_bytes()
            if device == "cpu" and needed > available:
                raise ValueError(f"{args.random_weights} ({args.random_format}, {dtype}) takes {needed / 1e9:.1f} GB, "
                                 f"more than the {available / 1e9:.1f} GB of memory available: pick a smaller shape, "
                                 "dtype or --random_format")
            return random_model(model_args, device, dtype, shard, args.random_format)
        if args.offload != "none":
            budget = parse_size(args.memory_budget) if args.memory_budget else None
            return offload.load_offloaded(args.checkpoint_path, device, dtype, args.offload, budget)
        return load_model(args.checkpoint_path, device, dtype, shard=tp.sharded_loader())
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None


def uses_packages(args, device: str) -> bool:
    """Whether decoding goes through ahead-of-time packages (aot_step.py): with --aot, built where missing;
    otherwise on a CPU, those already built, whenever the decode step would be the plain eager one."""
    plain_eager = not (args.compile or args.speculative or args.eager or args.offload != "none"
                       or tp.world_size() > 1)
    return args.aot or (device == "cpu" and plain_eager)


def cache_budget(args):
    """--memory_budget in bytes when it budgets the KV cache (without --offload, where it budgets the weights);
    None otherwise."""
    return parse_size(args.memory_budget) if args.memory_budget and args.offload == "none" else None


def check_length(model: Transformer, prompt_length: int, max_new_tokens: int):
    context = model.args.max_seq_length
    if prompt_length >= context:
        raise UsageError(f"the prompt has {prompt_length} tokens, longer than the model's context of {context}: "
                         "shorten it")
    if prompt_length + max_new_tokens > context:
        raise UsageError(f"prompt ({prompt_length} tokens) + --max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {context}: lower --max_new_tokens to {context - prompt_length}")


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
        fits = cache_rows_within(setup.model, budget, cache_length)
        if fits < 1:
            raise UsageError(f"--memory_budget {args.memory_budget} cannot hold one row of KV cache for "
                             f"{cache_length} tokens ({cache_bytes_per_slot(setup.model) * cache_length / 1e6:.1f} MB "
                             f"with --kv_cache {args.kv_cache}): raise it, or quantize the cache (--kv_cache)")
        batch_size = min(batch_size, fits)
    setup.model.setup_caches(batch_size, cache_length)
    draft = None
    if args.speculative == "draft":
        try:
            # the draft's own activations (--dtype auto picks them by what its file stores)
            draft_dtype = pick_dtype(args.dtype, setup.device, weights=stored_weights(args.draft_checkpoint_path))
            draft = load_draft(args.draft_checkpoint_path, setup.tokenizer, setup.device, draft_dtype)
            quantized_kv_cache.use(draft.model, args.kv_cache)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--draft_checkpoint_path: {error}") from None
    announce_cache(setup.model, args.kv_cache)
    verify_forward = compiled_verify_forward(args, setup.device) if args.speculative else None
    if not args.speculative:
        warm_up(setup, prompts[:batch_size], args.max_new_tokens)
    for sample_index in range(args.num_samples):
        profiling = args.profile and sample_index == args.num_samples - 1
        with torch.profiler.profile() if profiling else contextlib.nullcontext() as profiler:
            if args.speculative:
                run_speculative(args, setup, texts[0], prompts[0], draft, verify_forward)
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


def compiled_verify_forward(args, device: str):
    """With --compile, speculative decoding compiles the target's verify pass (one static shape) instead of
    the decode step."""
    if not args.compile:
        return None
    return compile_step(lookahead_logits if args.speculative == "lookahead" else target_logits, device,
                        cuda_graphs=False)


def run_speculative(args, setup: Setup, text: str, prompt: list, draft: DraftModel, verify_forward):
    """One prompt by speculative decoding, its text streamed, its statistics on stderr."""
    model, k = setup.model, args.speculate_k
    if args.speculative == "lookahead":  # room for the scratch slots of its last pass, before compiling
        model.setup_caches(1, len(prompt) + args.max_new_tokens + lookahead_rows(k, args.lookahead_window))
    if draft is not None:
        draft.model.setup_caches(1, model.max_seq_length)

    def speculate(max_new_tokens, stop_ids=(), on_token=None):
        if args.speculative == "lookahead":
            return lookahead_generate(model, prompt, max_new_tokens, k, args.lookahead_window, stop_ids, on_token,
                                      verify_forward)
        return speculative_generate(model, prompt, max_new_tokens, setup.sampling, k, draft, stop_ids, on_token,
                                    verify_forward)

    if verify_forward is not None:  # compile outside the timings, as warm_up does for plain decoding
        compile_announced(lambda: speculate(2 * k + 2))
    on_token, finish = streaming(setup.tokenizer)
    if not args.chat:
        print(text, end="", flush=True)
    started = time.perf_counter()
    output, stats = speculate(args.max_new_tokens, setup.tokenizer.stop_ids, on_token)
    seconds = time.perf_counter() - started
    finish()
    print(f"speculative ({args.speculative}, k={k}): {len(output)} tokens in {seconds:.2f} s, "
          f"{len(output) / seconds:.1f} tokens/s including prefill; acceptance rate {stats.acceptance_rate:.0%} "
          f"({stats.accepted}/{stats.proposed}); {stats.tokens_per_step:.2f} tokens per target forward pass",
          file=sys.stderr)


def interactive(args, setup: Setup):
    """Multi-turn chat. The whole conversation is re-rendered through the chat template each turn,
    and only the tokens that differ from what the KV cache already holds are run through the model."""
    model, tokenizer = setup.model, setup.tokenizer
    budget = cache_budget(args)
    if budget is None:
        max_seq_length = min(args.max_seq_length or 2048, model.args.max_seq_length)
    else:  # the longest context that fits
        max_seq_length = min(args.max_seq_length or model.args.max_seq_length, budget // cache_bytes_per_slot(model))
        if max_seq_length < 2 + args.max_new_tokens:
            raise UsageError(f"--memory_budget {args.memory_budget} holds a KV cache of {max_seq_length} tokens, "
                             f"too few for --max_new_tokens {args.max_new_tokens}: raise it, or quantize the cache "
                             "(--kv_cache)")
    model.setup_caches(1, max_seq_length)
    announce_cache(model, args.kv_cache)
    warm_up(setup, [tokenizer.encode("Hello")])
    messages = [{"role": "system", "content": args.system}] if args.system else []
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
        if len(conversation) + args.max_new_tokens > max_seq_length:
            print(f"the conversation ({len(conversation)} tokens) + --max_new_tokens would pass the "
                  f"{max_seq_length}-token context: start a new chat or raise --max_seq_length", file=sys.stderr)
            break
        on_token, finish = streaming(tokenizer)
        [reply], timing = generate(model, [conversation[reused:]], args.max_new_tokens, setup.sampling,
                                   tokenizer.stop_ids, start_pos=reused, on_token=on_token, steps=setup.steps)
        finish()
        cached = conversation + reply[:-1]  # the last sampled token has not been run through the model yet
        text = tokenizer.decode([t for t in reply if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": text})
        report(timing, model, 1, setup.device, "")


def read_line() -> str:
    try:
        return input("> ")
    except EOFError:
        return ""


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        device = pick_device(args.device)
        if args.aot and device != "cpu":
            raise UsageError(f"--aot builds a CPU decode step: on {device} use --compile (CUDA graphs on CUDA)")
        weights = args.random_format.split("-")[0] if args.random_weights else stored_weights(args.checkpoint_path)
        # --aot over float weights keeps fp32: its package of a bf16 model ran at eager speed (docs/experiments.md)
        compiled_decode = (args.compile or (args.aot and weights != "float")) and not args.speculative
        dtype = pick_dtype(args.dtype, device, compiled_decode, weights)
        tp.init(device)
        if tp.rank() > 0:  # under torchrun every rank generates the same text; rank 0 shows it
            sys.stdout = sys.stderr = open(os.devnull, "w")
        seed = tp.common_seed(args.seed)
        if seed is not None:
            torch.manual_seed(seed)
        texts = None if args.interactive else read_prompts(args)
        tokenizer = checkpoint_tokenizer(args)
        prompts = None if args.interactive else encode_prompts(args, tokenizer, texts)
        if args.random_weights:
            check_vocabulary(prompts, args.random_weights)
        started = time.perf_counter()
        model = quantized_kv_cache.use(load(args, device, dtype, tokenizer), args.kv_cache)
        packages = uses_packages(args, device)
        if device == "cpu" and (args.compile or packages):  # eagerly these forms compute as the plain ones do
            cpu_kernels.swap_in(model, compiled_decode=True)  # a mixture's float experts: fused loops
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
