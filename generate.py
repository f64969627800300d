"""Generate text with a brisk checkpoint.

    python generate.py --prompt "Once upon a time"            # complete a text
    python generate.py --chat --prompt "What is gravity?"     # one turn through the chat template
    python generate.py --interactive                          # multi-turn chat

Generated text goes to stdout as it is produced; timings and speed go to stderr.

How it is fast: one forward pass over the prompt (prefill) fills the static KV cache; then each new token
is one forward pass over a single position (decode), which reads every weight once, so decoding is bound by
memory bandwidth: the report says how many bytes each step reads and what bandwidth that achieved.
--compile turns the decode step into one fused graph (and, on CUDA, a CUDA graph replayed without Python).
"""
import argparse
import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

import offload
import tp
from model import ModelArgs, Transformer, load_model, unique_state_dict
from sampling import Sampling, sample
from tokenizer import StreamDecoder, load_tokenizer

DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct/model.safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def prefill(model: Transformer, tokens: Tensor, input_pos: Tensor, left_pad: Optional[Tensor], sampling: Sampling):
    logits = model(tokens, input_pos, left_pad)
    return sample(logits[:, -1], sampling)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, left_pad: Optional[Tensor],
                     sampling: Sampling):
    logits = model(token, input_pos, left_pad)
    return sample(logits[:, -1], sampling)


@dataclass
class Timing:
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0  # every token after the first
    decode_steps: int = 0  # forward passes after prefill, each reading every weight once
    decoded_tokens: int = 0  # tokens those steps produced, all unfinished rows counted


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: Sampling, stop_ids=(),
             start_pos: int = 0, on_token=None, prefill_step=prefill, decode_step=decode_one_token):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens, stopping a row at
    its first stop id (which is kept). Prompts of different lengths are left-padded into one batch;
    the model masks the padding, so each row gets what it would get alone. start_pos > 0 continues
    a single sequence whose first start_pos tokens are already in the KV cache.
    on_token(row, token_id) is called as each token is produced. Returns (new ids per row, Timing)."""
    device = model.rope.device
    longest = max(len(prompt) for prompt in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
    padding = [longest - len(prompt) for prompt in prompts]
    left_pad = torch.tensor(padding, device=device) if any(padding) else None
    timing = Timing()

    started = time.perf_counter()
    input_pos = torch.arange(start_pos, start_pos + longest, device=device)
    next_token = prefill_step(model, tokens.to(device), input_pos, left_pad, sampling).clone()
    outputs, finished = [[] for _ in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        for row, token_id in enumerate(next_token.view(-1).tolist()):  # the one host sync per step
            if not finished[row]:
                outputs[row].append(token_id)
                finished[row] = token_id in stop_ids
                if on_token:
                    on_token(row, token_id)
        now = time.perf_counter()
        if step == 0:
            timing.prefill_s, decode_started = now - started, now
        if all(finished) or step == max_new_tokens - 1:
            break
        input_pos = torch.tensor([start_pos + longest + step], device=device)
        next_token = decode_step(model, next_token, input_pos, left_pad, sampling).clone()
        timing.decode_steps += 1
        timing.decoded_tokens += sum(not done for done in finished)
    timing.decode_s = time.perf_counter() - decode_started
    return outputs, timing


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available (use --device cpu)")
    return name


def pick_dtype(name: str, device: str, compiled_decode: bool = False) -> torch.dtype:
    if name == "auto":
        # bf16 halves the bytes per step: on a CPU it decodes slower than fp32 eagerly (15 against 17 tokens/s,
        # SmolLM2) but faster in a compiled step's fused loops (38 against 25, model.fused_cpu_decode)
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device, torch.bfloat16 if compiled_decode
                                                                   else torch.float32)
    dtype = DTYPES[name]
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError):
        raise UsageError(f"--dtype {name} is not supported on {device}: try --dtype fp32") from None
    return dtype


def weights_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every weight once, as stored (int8 and int4 weights
    with their scales), except that an untied input embedding is only looked up (one row per token)."""
    return sum(tensor.numel() * tensor.element_size() for name, tensor in unique_state_dict(model).items()
               if model.args.tie_embeddings or not name.startswith("tok_embeddings."))


def kv_cache_bytes(model: Transformer, batch: int) -> int:
    """Bytes of KV cache one decode step reads: attention runs over every slot of the static cache
    (masked), so this is the whole cache of the rows in use, however short the sequence so far."""
    cache = model.layers[0].attention.kv_cache
    per_row = cache.k_cache[0].numel() * cache.k_cache.element_size() * 2
    return per_row * batch * len(model.layers)


def peak_memory_gb(device: str = "cpu") -> float:
    """Peak GPU memory allocated, or this process's peak resident memory. On Linux the latter is VmHWM:
    getrusage's ru_maxrss would also count the parent's memory, which a child started with fork carries
    until its exec."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1e6  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux, bytes on macOS


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
    parser.add_argument("--max_seq_length", type=int, help="KV cache length for --interactive (default 2048)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                        help="models larger than memory: keep the blocks on disk or in host memory and stream "
                             "each to the device as it runs (see offload.py)")
    parser.add_argument("--memory_budget", help="with --offload: memory the weights may take, e.g. 150MB or 2GB "
                        "(with disk on a CPU: the whole process); blocks beyond it stream")
    parser.add_argument("--batch_size", type=int, help="with --prompt_file: prompts generated together "
                        "(default: all of them)")
    parser.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    parser.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
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
    if args.interactive and (args.prompt or args.prompt_file):
        raise UsageError("--interactive reads prompts from the terminal: drop --prompt / --prompt_file")
    if args.interactive and args.random_weights:
        raise UsageError("--random_weights produces no text to chat with: drop --interactive")
    if args.speculative == "draft" and args.draft_checkpoint_path is None:
        raise UsageError("--speculative draft needs --draft_checkpoint_path")
    if args.speculative == "lookahead" and (args.temperature != 0 or args.lookahead_window < 1):
        raise UsageError("--speculative lookahead decodes greedily: add --temperature 0 (and --lookahead_window >= 1)")
    if args.speculative and (args.interactive or args.random_weights or args.speculate_k < 1):
        raise UsageError("--speculative needs --speculate_k >= 1 and a prompt (not --interactive / --random_weights)")
    if args.offload != "none" and (args.compile or args.compile_prefill or tp.world_size() > 1):
        raise UsageError("--offload streams blocks eagerly in one process: drop --compile / torchrun")
    if args.memory_budget and args.offload == "none":
        raise UsageError("--memory_budget applies to --offload cpu or disk: add --offload disk")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.prompt_file and not args.prompt_file.is_file():
        raise UsageError(f"--prompt_file {args.prompt_file}: no such file")


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    return prompts or ["Once upon a time"]


def load(args, device: str, dtype: torch.dtype):
    """The model and tokenizer, with clear errors for a missing or broken checkpoint."""
    try:
        tokenizer = load_tokenizer(args.checkpoint_path)
    except (FileNotFoundError, ValueError) as error:
        hint = " (run: bash scripts/setup.sh)" if args.checkpoint_path == DEFAULT_CHECKPOINT else ""
        raise UsageError(f"{error}{hint}") from None
    if args.random_weights:
        try:
            model_args = ModelArgs.from_name(args.random_weights)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if tokenizer.vocab_size > model_args.vocab_size:
            raise UsageError(f"the tokenizer at {args.checkpoint_path} has {tokenizer.vocab_size} tokens, more than "
                             f"{args.random_weights}'s {model_args.vocab_size}: pass a matching --checkpoint_path")
        return random_model(model_args, device, dtype), tokenizer
    try:
        if args.offload != "none":
            budget = offload.parse_size(args.memory_budget) if args.memory_budget else None
            return offload.load_offloaded(args.checkpoint_path, device, dtype, args.offload, budget), tokenizer
        return load_model(args.checkpoint_path, device, dtype, shard=tp.sharded_loader()), tokenizer
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None


def random_model(model_args: ModelArgs, device: str, dtype: torch.dtype) -> Transformer:
    """Random weights (normal, std 0.02) of a known shape; under torchrun, this rank's share of them."""
    with torch.device("meta"):
        model = Transformer(model_args)
    if tp.world_size() > 1:
        tp.shard(model, {}, tp.rank(), tp.world_size())
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, parameter in unique_state_dict(model).items():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0, 0.02)
    return model.eval()


# Inductor's wrapper checks each input's size and stride again before a CPU step's kernels run, after Dynamo's
# guards have (40 checks a block, 30 blocks for SmolLM2). Without the repeat, compiled SmolLM2 decodes int8 48 ->
# 52 tokens/s and bf16 40 -> 43 (2 Xeon cores, one process, interleaved).
CPU_COMPILE_OPTIONS = {"size_asserts": False}


def compile_step(step, device: str, cuda_graphs: bool = True):
    """torch.compile a step as one graph, no graph breaks (fullgraph); on CUDA captured as a CUDA graph
    (reduce-overhead) so that a step costs a single launch. Shapes stay static: a new batch size compiles
    afresh (torch 2.13 fails inside Dynamo when it would reuse the compiled block with a symbolic batch)."""
    if device == "cuda":
        return torch.compile(step, mode="reduce-overhead" if cuda_graphs else None, fullgraph=True, dynamic=False)
    return torch.compile(step, fullgraph=True, dynamic=False, options=CPU_COMPILE_OPTIONS)


def compile_steps(args, device):
    """The decode step (--compile) and prefill (--compile_prefill) compiled. With --speculative, the step
    compiled is the target's verify pass instead (k + 1 tokens at a time)."""
    decode_step, prefill_step = decode_one_token, prefill
    if args.compile and args.speculative:
        from speculative import lookahead_logits, target_logits

        forward = lookahead_logits if args.speculative == "lookahead" else target_logits
        return compile_step(forward, device, cuda_graphs=False), prefill_step
    if args.compile:
        decode_step = compile_step(decode_one_token, device)
    if args.compile_prefill:
        prefill_step = torch.compile(prefill, fullgraph=True, dynamic=True)
    return decode_step, prefill_step


def warm_up(model, prompts, sampling, steps):
    """With --compile, run a few tokens first so that compilation is not counted as decoding time."""
    decode_step, prefill_step = steps
    if decode_step is decode_one_token and prefill_step is prefill:
        return
    started = time.perf_counter()
    generate(model, prompts, 3, sampling, prefill_step=prefill_step, decode_step=decode_step)
    print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def report(timing: Timing, model: Transformer, batch: int, device: str, label: str):
    seconds = timing.decode_s or float("nan")
    tokens_per_s, steps_per_s = timing.decoded_tokens / seconds, timing.decode_steps / seconds
    weights, kv = weights_bytes(model), kv_cache_bytes(model, batch)
    # under torchrun each rank reads its own share of the weights and cache: the figures are rank 0's
    per_rank = f" per rank, {tp.world_size()} ranks" if tp.world_size() > 1 else ""
    memory = " / ".join(f"{gb:.2f}" for gb in tp.gathered(peak_memory_gb(device)))
    print(f"{label}time to first token {timing.prefill_s * 1000:.1f} ms; decode {timing.decoded_tokens} tokens "
          f"in {timing.decode_s:.2f} s: {tokens_per_s:.1f} tokens/s; memory bandwidth "
          f"{(weights + kv) * steps_per_s / 1e9:.1f} GB/s (weights {weights / 1e6:.0f} MB + KV cache "
          f"{kv / 1e6:.0f} MB per step{per_rank}){offload.streamed_bytes(model, timing)}; peak memory {memory} GB",
          file=sys.stderr)


def run_prompts(args, model, tokenizer, sampling, device, steps):
    texts = read_prompts(args)
    messages = lambda text: ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}]
    prompts = [tokenizer.encode(tokenizer.render_chat(messages(t)) if args.chat else t) for t in texts]
    check_length(model, max(map(len, prompts)), args.max_new_tokens)
    if args.speculative and len(prompts) > 1:
        raise UsageError("--speculative runs one prompt at a time: pass a single --prompt")
    if args.speculative:
        from speculative import load_draft, run_speculative
    draft = load_draft(args, tokenizer, device, model.norm.weight.dtype) if args.speculative == "draft" else None
    batch_size = min(args.batch_size or len(prompts), len(prompts))
    model.setup_caches(batch_size, max(map(len, prompts)) + args.max_new_tokens)
    if draft:
        draft.model.setup_caches(1, model.max_seq_length)
    if not args.speculative:
        warm_up(model, prompts[:batch_size], sampling, steps)
    decode_step, prefill_step = steps
    for sample_index in range(args.num_samples):
        profiling = args.profile and sample_index == args.num_samples - 1
        stream = StreamDecoder(tokenizer) if len(prompts) == 1 and not args.random_weights else None
        if stream and not args.chat:
            print(texts[0], end="", flush=True)
        on_token = (lambda row, token_id: print(stream.push(token_id), end="", flush=True)) if stream else None
        on_token = shown_text(tokenizer, on_token)
        profiler = torch.profiler.profile() if profiling else contextlib.nullcontext()
        if args.speculative:
            run_speculative(args, model, tokenizer, prompts[0], sampling, draft, on_token,
                            decode_step if args.compile else None)
            print(stream.flush(), flush=True)
            continue
        label = f"sample {sample_index + 1}: " if args.num_samples > 1 else ""
        with profiler:
            for start in range(0, len(prompts), batch_size):
                last = min(start + batch_size, len(prompts))
                which = "" if batch_size == len(prompts) else f"prompts {start + 1}-{last}: "
                run_batch(args, model, tokenizer, texts[start:start + batch_size], prompts[start:start + batch_size],
                          sampling, device, steps, stream, on_token, label + which)
        if profiling:
            profiler.export_chrome_trace(str(args.profile))
            print(f"wrote a Chrome trace to {args.profile}", file=sys.stderr)


def run_batch(args, model, tokenizer, texts, prompts, sampling, device, steps, stream, on_token, label):
    decode_step, prefill_step = steps
    outputs, timing = generate(model, prompts, args.max_new_tokens, sampling, tokenizer.stop_ids,
                               on_token=on_token, prefill_step=prefill_step, decode_step=decode_step)
    if stream:
        print(stream.flush(), flush=True)
    elif not args.random_weights:
        for text, output in zip(texts, outputs):
            shown = [token_id for token_id in output if token_id not in tokenizer.stop_ids]
            print(("" if args.chat else text) + tokenizer.decode(shown), end="\n\n", flush=True)
    report(timing, model, len(prompts), device, label)


def shown_text(tokenizer, on_token):
    """on_token, skipping the stop tokens that end a reply (they are markers, not text)."""
    if on_token is None:
        return None
    return lambda row, token_id: None if token_id in tokenizer.stop_ids else on_token(row, token_id)


def check_length(model, prompt_length, max_new_tokens):
    context = model.args.max_seq_length
    if prompt_length >= context:
        raise UsageError(f"the prompt has {prompt_length} tokens, longer than the model's context of {context}: "
                         "shorten it")
    if prompt_length + max_new_tokens > context:
        raise UsageError(f"prompt ({prompt_length} tokens) + --max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {context}: lower --max_new_tokens to {context - prompt_length}")


def interactive(args, model, tokenizer, sampling, device, steps):
    """Multi-turn chat. The whole conversation is re-rendered through the chat template each turn,
    and only the tokens that differ from what the KV cache already holds are run through the model."""
    max_seq_length = min(args.max_seq_length or 2048, model.args.max_seq_length)
    model.setup_caches(1, max_seq_length)
    warm_up(model, [tokenizer.encode("Hello")], sampling, steps)
    decode_step, prefill_step = steps
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
        stream = StreamDecoder(tokenizer)
        on_token = shown_text(tokenizer, lambda row, token_id: print(stream.push(token_id), end="", flush=True))
        [reply], timing = generate(model, [conversation[reused:]], args.max_new_tokens, sampling, tokenizer.stop_ids,
                                   start_pos=reused, on_token=on_token, prefill_step=prefill_step,
                                   decode_step=decode_step)
        print(stream.flush(), flush=True)
        cached = conversation + reply[:-1]  # the last sampled token has not been run through the model yet
        text = tokenizer.decode([t for t in reply if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": text})
        report(timing, model, 1, device, "")


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
        dtype = pick_dtype(args.dtype, device, compiled_decode=args.compile and not args.speculative)
        tp.init(device)
        if tp.rank() > 0:  # under torchrun every rank generates the same text; rank 0 shows it
            sys.stdout = sys.stderr = open(os.devnull, "w")
        seed = tp.common_seed(args.seed)
        if seed is not None:
            torch.manual_seed(seed)
        started = time.perf_counter()
        model, tokenizer = load(args, device, dtype)
        print(f"loaded {args.random_weights or args.checkpoint_path} ({dtype}, {device}) in "
              f"{time.perf_counter() - started:.2f} s", file=sys.stderr)
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        steps = compile_steps(args, device)
        if args.interactive:
            interactive(args, model, tokenizer, sampling, device, steps)
        else:
            run_prompts(args, model, tokenizer, sampling, device, steps)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        tp.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
