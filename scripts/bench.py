"""Benchmark brisk on one checkpoint: for each precision, decode tokens/s (prefill excluded), prefill tokens/s
at several prompt lengths, time to first token, compile time, and the memory bandwidth that decode speed
implies, also as a share of this machine's own bandwidth (measured here: a large streaming read with the
same thread count). Batch 1, greedy. Prints a Markdown table and writes JSON.

    python scripts/bench.py                                   # SmolLM2, fp32 bf16 int8 int4, eager and compiled
    python scripts/bench.py --precisions fp32 int8 --no_compile --json results.json

int8 and int4 (groupsize --groupsize, round to nearest) are quantized in memory from the checkpoint.
Other engines on the same weights: scripts/bench_peers.py; context, batch and model-size curves:
scripts/bench_scaling.py.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantize  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import peak_memory_gb  # noqa: E402
from generation import Steps, compile_steps, generate, weights_bytes  # noqa: E402
from prepare import prepare  # noqa: E402
from sampling import Sampling  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8", "int4")


def machine_bandwidth_gbs(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """How fast torch can read a buffer much larger than the caches: the best of a plain sum and a
    matrix-vector product (decoding's own access pattern, usually the faster), best repeat, in GB/s."""
    matrix = torch.ones(int(gigabytes * 1e9 / 4 / 4096), 4096, dtype=torch.float32)
    vector = torch.ones(1, 4096)
    best = float("inf")
    for read in (lambda: matrix.sum(), lambda: vector @ matrix.T):
        for _ in range(repeats):
            started = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - started)
    return matrix.numel() * 4 / best / 1e9


def build(checkpoint: Path, precision: str, groupsize: int, step: str = "eager"):
    return at_precision(load_model(checkpoint, "cpu", precision_dtype(precision)), precision, groupsize, step)


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a precision's model is loaded in (int8 / int4 are quantized from fp32 weights, and keep fp32
    activations, as `--dtype auto` gives a quantized checkpoint: prepare.activation_dtype)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def at_precision(model, precision: str, groupsize: int, step: str = "eager"):
    """int8 / int4 (round to nearest) quantized in memory: the embedding / output head too, as llama.cpp's
    Q8_0 / Q4 files hold it; every model then prepared for a CPU step (prepare.prepare)."""
    if precision in ("int8", "int4"):
        quantize.quantize_rtn(model, precision, groupsize, quantize_embedding=True)
    return prepare(model, "cpu", step)


def synthetic_tokens(length: int, vocab_size: int) -> list:
    """A fixed, varied prompt: speed does not depend on which tokens, only on how many."""
    return [(7 * i + 10) % vocab_size for i in range(length)]


@torch.no_grad()
def measure(model, steps: Steps, max_new_tokens: int, prefill_lengths: list, repeats: int) -> dict:
    greedy = Sampling(temperature=0)
    model.setup_caches(1, max(prefill_lengths + [16]) + max_new_tokens + 1)
    prompt = synthetic_tokens(16, model.args.vocab_size)
    started = time.perf_counter()
    generate(model, [prompt], 3, greedy, steps=steps)  # warm-up; with --compile, compiles
    result = {"warm_up_s": time.perf_counter() - started}
    decode = []
    for _ in range(repeats):
        _, timing = generate(model, [prompt], max_new_tokens, greedy, steps=steps)
        decode.append(timing.decoded_tokens / timing.decode_s)
    result["decode_tokens_per_s"] = statistics.median(decode)
    for length in prefill_lengths:
        tokens = torch.tensor([synthetic_tokens(length, model.args.vocab_size)])
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(tokens, torch.arange(length))
            times.append(time.perf_counter() - started)
        result[f"prefill_{length}_tokens_per_s"] = length / statistics.median(times)
        result[f"time_to_first_token_{length}_ms"] = statistics.median(times) * 1000
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--groupsize", type=int, default=32, help="int4 groupsize")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--prefill_lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--no_compile", action="store_true", help="eager only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    machine = machine_bandwidth_gbs()
    print(f"machine: {args.threads} threads, streaming read {machine:.1f} GB/s; torch {torch.__version__}",
          file=sys.stderr)
    rows = []
    for precision in args.precisions:
        modes = [("eager", Steps())] + ([] if args.no_compile else [("compiled", compile_steps("cpu"))])
        for mode, step in modes:
            model = build(args.checkpoint_path, precision, args.groupsize, mode)
            result = {"precision": precision, "mode": mode, **measure(
                model, step, args.max_new_tokens, args.prefill_lengths, args.repeats)}
            result["weights_mb"] = weights_bytes(model) / 1e6
            result["bandwidth_gbs"] = weights_bytes(model) * result["decode_tokens_per_s"] / 1e9
            result["bandwidth_share"] = result["bandwidth_gbs"] / machine
            rows.append(result)
            print(f"{precision} {mode}: {result['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)

    prefill_columns = " | ".join(f"prefill {n} tok/s" for n in args.prefill_lengths)
    print(f"| precision | mode | decode tok/s | bandwidth GB/s | share of {machine:.0f} GB/s | {prefill_columns} "
          f"| warm-up s |")
    print("| --- " * (6 + len(args.prefill_lengths)) + "|")
    for row in rows:
        prefill = " | ".join(f"{row[f'prefill_{n}_tokens_per_s']:.0f}" for n in args.prefill_lengths)
        print(f"| {row['precision']} | {row['mode']} | {row['decode_tokens_per_s']:.1f} | {row['bandwidth_gbs']:.1f} "
              f"| {row['bandwidth_share']:.0%} | {prefill} | {row['warm_up_s']:.1f} |")
    if args.json:
        peak_gb = peak_memory_gb()
        args.json.write_text(json.dumps({"machine_bandwidth_gbs": machine, "threads": args.threads,
                                         "torch": torch.__version__, "peak_rss_gb": peak_gb, "results": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
