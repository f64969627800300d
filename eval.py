"""Evaluate a checkpoint: perplexity on a text file, or lm-evaluation-harness tasks.

    python eval.py --text_file notes.txt                                  # perplexity
    python eval.py --checkpoint_path checkpoints/NAME/model_int8.safetensors --text_file notes.txt
    python eval.py --tasks hellaswag,arc_easy                             # needs `pip install lm_eval`

Perplexity: the file is tokenized once and scored in windows of --max_seq_length tokens that start
every --stride tokens. Each window scores only the tokens no earlier window scored, so every token
after the first is scored exactly once, with at least max_seq_length - stride tokens of context
(the sliding-window method). The windows are the same whatever --batch_size, and so are the numbers.
"""
import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import quantized_kv_cache
from checkpoint import load_model
from cli import DTYPES, UsageError, fail, pick_device, read_text
from generation import generate
from prepare import prepare
from sampling import Sampling
from tokenizer import load_tokenizer


def windows(n_tokens: int, max_seq_length: int, stride: int):
    """(begin, end, first_scored) of each window: tokens[begin:end] are fed to the model, and the
    predictions of tokens[first_scored:end] are scored. A window's own first token has no context in
    it, so with stride == max_seq_length the token at each window's start goes unscored."""
    spans, scored_up_to = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_length, n_tokens)
        first_scored = max(scored_up_to, begin + 1)
        if end > first_scored:
            spans.append((begin, end, first_scored))
            scored_up_to = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def token_log_probs(model, inputs: torch.Tensor, one_token_at_a_time: bool = False) -> torch.Tensor:
    """log p(inputs[:, t + 1] | inputs[:, :t + 1]) for every t: (batch, length - 1), in float32. One forward
    pass over the window, or one_token_at_a_time: a pass per position, as decoding computes it (a device's
    forms for a few rows, such as the CPU's int4 kernel, instead of those for many)."""
    batch, length = inputs.shape
    model.setup_caches(max(batch, model.max_batch_size), max(length, model.max_seq_length))
    positions = torch.arange(length, device=inputs.device)
    if one_token_at_a_time:
        logits = torch.cat([model(inputs[:, t:t + 1], positions[t:t + 1]) for t in range(length - 1)], dim=1).float()
    else:
        logits = model(inputs, positions)[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), -1, inputs[:, 1:].unsqueeze(-1)).squeeze(-1)


def perplexity(model, tokens: list, max_seq_length: int, stride: int, batch_size: int = 1,
               progress: bool = False, one_token_at_a_time: bool = False) -> dict:
    """Mean negative log-likelihood and perplexity of tokens, scored in windows; progress: a bar on stderr;
    one_token_at_a_time: see token_log_probs."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    spans = windows(len(tokens), max_seq_length, stride)
    total_nll, scored = 0.0, 0
    by_length = {}  # windows of one length run together; only the last window may be shorter
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), desc="scoring", unit="window", disable=not progress, leave=False)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            inputs = torch.tensor([tokens[begin:end] for begin, end, _ in batch], device=device)
            log_probs = token_log_probs(model, inputs, one_token_at_a_time)
            for row, (begin, end, first_scored) in enumerate(batch):
                # log_probs[:, t] scores token begin + t + 1
                total_nll -= log_probs[row, first_scored - begin - 1:].double().sum().item()
                scored += end - first_scored
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - started
    return {"tokens_scored": scored, "windows": len(spans), "mean_nll": total_nll / scored,
            "perplexity": math.exp(total_nll / scored), "seconds": seconds}


def continuation_scores(model, tokenizer, requests: list):
    """lm-evaluation-harness's loglikelihood: for each (context, continuation), the summed log
    probability of the continuation's tokens and whether greedy decoding would have produced them."""
    results = []
    for context, continuation in requests:
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(continuation, bos=False)
        ids = (context_ids + continuation_ids)[-model.args.max_seq_length:]
        inputs = torch.tensor([ids], device=next(model.parameters()).device)
        model.setup_caches(1, max(len(ids), model.max_seq_length))
        with torch.no_grad():
            logits = model(inputs, torch.arange(len(ids), device=inputs.device))[0, :-1].float()
        wanted = logits[-len(continuation_ids):]
        targets = inputs[0, -len(continuation_ids):]
        log_prob = F.log_softmax(wanted, dim=-1).gather(-1, targets[:, None]).sum().item()
        results.append((log_prob, bool((wanted.argmax(-1) == targets).all())))
    return results


def run_tasks(model, tokenizer, tasks: list, max_seq_length: int, limit=None, include_path=None) -> dict:
    """Run lm-evaluation-harness tasks through a small adapter around brisk's model."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class BriskLM(LM):
        def loglikelihood(self, requests):
            return continuation_scores(model, tokenizer, [request.args for request in requests])

        def loglikelihood_rolling(self, requests):
            # the whole text's log-likelihood, its first token predicted from a BOS (or EOS) prefix
            prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            scores = []
            for request in requests:
                result = perplexity(model, [prefix] + tokenizer.encode(request.args[0], bos=False),
                                    max_seq_length, max_seq_length // 2)
                scores.append(-result["mean_nll"] * result["tokens_scored"])
            return scores

        def generate_until(self, requests):
            outputs = []
            for request in requests:
                context, options = request.args
                ids = tokenizer.encode(context)
                max_new = options.get("max_gen_toks", 256)
                model.setup_caches(1, len(ids) + max_new)
                [new], _ = generate(model, [ids], max_new, Sampling(temperature=0), tokenizer.stop_ids)
                text = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
                for stop in options.get("until", []):
                    text = text.split(stop)[0]
                outputs.append(text)
            return outputs

    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    return lm_eval.simple_evaluate(model=BriskLM(), tasks=tasks, limit=limit, task_manager=task_manager)["results"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"),
                        help="a checkpoint directory, or one of its .safetensors files (quantized ones too)")
    parser.add_argument("--text_file", type=Path, help="plain text to measure perplexity on")
    parser.add_argument("--max_seq_length", type=int, help="tokens per window (default: 1024, or the model's "
                        "context if shorter)")
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: max_seq_length / 2)")
    parser.add_argument("--batch_size", type=int, default=1, help="windows run together")
    parser.add_argument("--limit_tokens", type=int, help="score only the first N tokens of the file")
    parser.add_argument("--one_token_at_a_time", action="store_true", help="perplexity through decode steps, one "
                        "position per forward pass, as generation computes it (slow: a pass per token)")
    parser.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--limit", type=int, help="--tasks: examples per task")
    parser.add_argument("--include_path", type=Path, help="--tasks: a folder of your own task YAML files")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--kv_cache", default="float", choices=list(quantized_kv_cache.KV_CACHE_TYPES),
                        help="the KV cache in the model's dtype, or quantized (int8, int4): attention reads every "
                             "key and value back from it, so its error shows in the perplexity")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        return fail(str(error))


def check_args(args):
    if not args.text_file and not args.tasks:
        raise UsageError("nothing to evaluate: pass --text_file PATH (perplexity) and/or --tasks NAMES")
    if args.tasks and importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install lm_eval")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise UsageError(f"--max_seq_length must be >= 2 (a token and one to predict), got {args.max_seq_length}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.limit_tokens is not None and args.limit_tokens < 2:
        raise UsageError(f"--limit_tokens must be >= 2, got {args.limit_tokens}")


def run(args) -> int:
    check_args(args)
    text = read_text(args.text_file, "--text_file") if args.text_file else None
    device = pick_device(args.device)
    try:
        model = prepare(load_model(args.checkpoint_path, device, DTYPES[args.dtype]), device)
        tokenizer = load_tokenizer(args.checkpoint_path)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    max_seq_length = args.max_seq_length or min(1024, model.args.max_seq_length)
    if max_seq_length > model.args.max_seq_length:
        raise UsageError(f"--max_seq_length {max_seq_length} is past the model's context of "
                         f"{model.args.max_seq_length}")
    stride = args.stride or max_seq_length // 2
    if not 0 < stride <= max_seq_length:
        raise UsageError(f"--stride must be in [1, --max_seq_length], got {stride}")

    quantized_kv_cache.use(model, args.kv_cache)
    results = {"checkpoint": str(args.checkpoint_path), "kv_cache": args.kv_cache}
    if text is not None:
        tokens = tokenizer.encode(text)[:args.limit_tokens]
        if len(tokens) < 2:
            raise UsageError(f"--text_file {args.text_file} holds {len(tokens)} token(s): perplexity needs at least 2")
        results.update(perplexity(model, tokens, max_seq_length, stride, args.batch_size, progress=True,
                                  one_token_at_a_time=args.one_token_at_a_time))
        print(f"{args.text_file}: {results['tokens_scored']} tokens scored in {results['windows']} windows of "
              f"{max_seq_length} (stride {stride}); mean NLL {results['mean_nll']:.4f}; "
              f"perplexity {results['perplexity']:.4f}; {results['seconds']:.1f} s", file=sys.stderr)
    if args.tasks:
        results["tasks"] = run_tasks(model, tokenizer, args.tasks.split(","), max_seq_length, args.limit,
                                     args.include_path)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
