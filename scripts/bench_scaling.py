"""How brisk's decoding scales, at one precision: tokens/s as the context grows (KV cache length), total
tokens/s as the batch grows, and tokens/s across model sizes (SmolLM2-135M's real weights; the 360M and
1.7B shapes with random weights, since speed depends only on shapes). Greedy; batch 1 except on the batch
curve; the context of the batch and size curves is --context. Writes a Markdown table, JSON and a PNG plot.
With several --kv_caches, the context curve is drawn for each cache type (tokens/s and peak memory), and
with --memory_budget each type also decodes the largest batch whose cache of --context slots fits it.

    python scripts/bench_scaling.py                            # fp32, eager
    python scripts/bench_scaling.py --precision int8 --compile --out bench_results
    python scripts/bench_scaling.py --kv_caches float int8 int4 --contexts 512 2048 8192 --batches \
        --sizes --memory_budget 200MB --context 2048           # the cache types only

A point at context L decodes the last new tokens into the cache's last slots: brisk's static cache is
attended in full under a mask, so a step costs what a step at position L costs in a real conversation.
With --compile every point is a new shape, compiled afresh (minutes each). The plot needs matplotlib
(requirements-bench.txt); without it the table and JSON are still written.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantized_kv_cache  # noqa: E402
from checkpoint import parameter_count, random_model  # noqa: E402
from cli import UsageError, fail, parse_size, peak_memory_gb  # noqa: E402
from generation import (Steps, cache_bytes_per_slot, cache_rows_within, compile_steps, generate,  # noqa: E402
                        weights_bytes)
from model_args import ModelArgs  # noqa: E402
from sampling import Sampling  # noqa: E402
from scripts.bench import PRECISIONS, at_precision, build, precision_dtype, synthetic_tokens  # noqa: E402
from tokenizer import write_atomic  # noqa: E402

CONTEXTS = (128, 512, 2048, 8192)
BATCHES = (1, 2, 4, 8, 16, 32)
RANDOM_SIZES = ("SmolLM2-360M", "SmolLM2-1.7B")


def reset_peak_memory():
    """Start this process's peak resident memory (VmHWM) again from what it holds now, after handing the
    memory earlier points freed back to the system (Linux with glibc; elsewhere the figures are peaks since
    the start)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def decode_rate(model, compiled: bool, batch: int, context: int, new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s (all rows counted) of `batch` rows whose last token lands at slot context - 1."""
    model.max_batch_size = -1  # a fresh cache each point, so that the peak memory holds this point's cache only
    reset_peak_memory()
    model.setup_caches(batch, context)
    prompt = synthetic_tokens(8, model.args.vocab_size)
    start = context - len(prompt) - new_tokens
    if start < 0:
        raise SystemExit(f"error: context {context} is shorter than 8 prompt + {new_tokens} new tokens")
    steps = Steps()
    if compiled:
        torch._dynamo.reset()  # a fresh compile per shape, not the recompile limit's eager fallback
        steps = compile_steps("cpu")
    greedy = Sampling(temperature=0)
    generate(model, [prompt] * batch, 3, greedy, start_pos=start, steps=steps)  # warm-up (and compile)
    rates = []
    for _ in range(repeats):
        _, timing = generate(model, [prompt] * batch, new_tokens, greedy, start_pos=start, steps=steps)
        rates.append(timing.decoded_tokens / timing.decode_s)
    return statistics.median(rates)


def models(checkpoint: Path, precision: str, groupsize: int, sizes, step: str):
    """(name, model) for the real checkpoint, then each random shape in `sizes`, one in memory at a time."""
    yield checkpoint.name, build(checkpoint, precision, groupsize, step)
    for name in sizes:
        torch.manual_seed(0)
        yield name, at_precision(random_model(ModelArgs.from_name(name), "cpu", precision_dtype(precision)),
                                 precision, groupsize, step)


def run(args) -> list:
    points = []

    def measured(curve, name, model, batch, context, kv_cache="float"):
        quantized_kv_cache.use(model, kv_cache)
        rate = decode_rate(model, args.compile, batch, context, args.max_new_tokens, args.repeats)
        point = {"curve": curve, "model": name, "parameters": parameter_count(model.args),
                 "weights_mb": weights_bytes(model) / 1e6, "batch": batch, "context": context,
                 "kv_cache": kv_cache, "cache_mb": cache_bytes_per_slot(model) * batch * context / 1e6,
                 "peak_memory_gb": peak_memory_gb(), "decode_tokens_per_s": rate}
        print(f"{curve}: {name} batch {batch} context {context}, {kv_cache} cache: {rate:.1f} tokens/s",
              file=sys.stderr, flush=True)
        points.append(point)

    sized = models(args.checkpoint_path, args.precision, args.groupsize, args.sizes,
                   "compiled" if args.compile else "eager")
    for index, (name, model) in enumerate(sized):
        if index == 0:
            for kv_cache in args.kv_caches:
                for context in args.contexts:
                    measured("context", name, model, 1, context, kv_cache)
            for batch in args.batches:
                measured("batch", name, model, batch, args.context)
            for kv_cache in args.kv_caches if args.memory_budget else ():
                rows = cache_rows_within(quantized_kv_cache.use(model, kv_cache), args.memory_budget, args.context)
                if rows < 1:
                    raise SystemExit(f"error: --memory_budget holds no row of {args.context} slots of a {kv_cache} "
                                     "cache: raise it or lower --context")
                measured("budget", name, model, rows, args.context, kv_cache)
        measured("size", name, model, 1, args.context)
        del model
    return points


def markdown(points: list, title: str) -> str:
    lines = [f"{title}", "",
             "| curve | model | batch | context | KV cache | cache MB | peak memory GB | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {p['curve']} | {p['model']} | {p['batch']} | {p['context']} | {p['kv_cache']} | "
              f"{p['cache_mb']:.1f} | {p['peak_memory_gb']:.2f} | {p['decode_tokens_per_s']:.1f} |" for p in points]
    return "\n".join(lines) + "\n"


def plot(points: list, title: str, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(curve, x, y, label) for curve, x, y, label in (
        ("context", "context", "decode_tokens_per_s", "KV cache length (tokens)"),
        ("context", "context", "peak_memory_gb", "KV cache length (tokens)"),
        ("batch", "batch", "decode_tokens_per_s", "batch size (rows)"),
        ("size", "parameters", "decode_tokens_per_s", "parameters")) if any(p["curve"] == curve for p in points)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4), squeeze=False)
    for axis, (curve, x, y, label) in zip(axes[0], panels):
        for kv_cache in dict.fromkeys(p["kv_cache"] for p in points if p["curve"] == curve):
            chosen = [p for p in points if p["curve"] == curve and p["kv_cache"] == kv_cache]
            axis.plot([p[x] for p in chosen], [p[y] for p in chosen], marker="o", label=f"{kv_cache} KV cache")
        if curve == "context":
            axis.legend()
        axis.set_xscale("log", base=2 if curve != "size" else 10)
        if curve == "size":
            axis.minorticks_off()
            axis.set_xticks([p[x] for p in chosen], [f"{p[x] / 1e6:.0f}M" for p in chosen])
        axis.set_xlabel(label)
        axis.set_ylabel("peak memory (GB)" if y == "peak_memory_gb" else
                        "decode tokens/s" + (" (all rows)" if curve == "batch" else ""))
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, path)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--groupsize", type=int, default=32, help="int4 groupsize")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (once per point)")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    parser.add_argument("--sizes", nargs="*", default=list(RANDOM_SIZES), help="random-weight shapes to add")
    parser.add_argument("--context", type=int, default=256, help="KV cache length of the batch, budget and size "
                        "curves")
    parser.add_argument("--kv_caches", nargs="+", default=["float"], choices=list(quantized_kv_cache.KV_CACHE_TYPES),
                        help="KV cache types, each a context curve (and a budget point)")
    parser.add_argument("--memory_budget", help="memory the KV cache may take: each type decodes "
                        "the largest batch of --context slots that fits (e.g. 200MB)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="directory for .md, .json, .png")
    args = parser.parse_args(argv)
    if not (args.checkpoint_path / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint at {args.checkpoint_path}: run scripts/prepare_default.py first")
    try:
        args.memory_budget = parse_size(args.memory_budget) if args.memory_budget else None
    except UsageError as error:
        return fail(str(error))
    torch.set_num_threads(args.threads)
    mode = "compiled" if args.compile else "eager"
    title = f"brisk {args.precision} {mode}, {args.threads} threads, torch {torch.__version__}"
    points = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scaling_{args.precision}_{mode}"
    table = markdown(points, title)
    write_atomic(stem.with_suffix(".md"), table)
    write_atomic(stem.with_suffix(".json"), json.dumps(
        {"precision": args.precision, "mode": mode, "threads": args.threads, "torch": torch.__version__,
         "points": points}, indent=2))
    plotted = plot(points, title, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.md, {stem}.json" + (f", {stem}.png" if plotted else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
