"""Decode speed of a mixture of experts against the dense model with the same active parameters, both on
random weights, measured in one run and interleaved (the machine's drift cancels in the ratio). Batch 1,
greedy. Prints a Markdown table and writes JSON.

    python scripts/bench_moe.py                           # SmolLM2-135M's blocks, 8 experts, 2 per token
    python scripts/bench_moe.py --base SmolLM2-360M --experts 16 --per_token 2 --precisions bf16 --no_compile

The mixture: every block's feed-forward replaced by --experts experts of the base's width, each token routed
to --per_token of them. Its dense twin: one feed-forward --per_token times as wide, so that a token reads
the same feed-forward weights in both; the router (experts x dim per block) is the mixture's only extra.
"""
import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import random_model  # noqa: E402
from cli import fail  # noqa: E402
from generation import Steps, compile_steps, weights_bytes  # noqa: E402
from model_args import ModelArgs  # noqa: E402
from scripts.bench import PRECISIONS, at_precision, measure, precision_dtype  # noqa: E402


def shapes(base: str, experts: int, per_token: int) -> dict:
    args = ModelArgs.from_name(base)
    return {"dense": dataclasses.replace(args, intermediate_size=args.intermediate_size * per_token),
            "moe": dataclasses.replace(args, n_experts=experts, experts_per_token=per_token)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="SmolLM2-135M", help="a known shape whose blocks the experts copy")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--per_token", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="int8 / int4: round to nearest, groups of 32, the router kept in floating point")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs; medians are reported")
    parser.add_argument("--no_compile", action="store_true", help="eager only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.per_token <= args.experts:
        return fail(f"--per_token must be between 1 and --experts ({args.experts}), got {args.per_token}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    rows = []
    for precision in args.precisions:
        for mode in ["eager"] + ([] if args.no_compile else ["compiled"]):
            models = {kind: at_precision(random_model(shape, dtype=precision_dtype(precision)), precision, 32,
                                         mode) for kind, shape in shapes(args.base, args.experts,
                                                                         args.per_token).items()}
            steps = compile_steps("cpu") if mode == "compiled" else Steps()
            speeds = {kind: [] for kind in models}
            for _ in range(args.repeats):
                for kind, model in models.items():
                    result = measure(model, steps, args.max_new_tokens, [16], repeats=1)
                    speeds[kind].append(result["decode_tokens_per_s"])
            row = {"precision": precision, "mode": mode,
                   **{f"{kind}_tokens_per_s": statistics.median(speed) for kind, speed in speeds.items()},
                   **{f"{kind}_active_mb": weights_bytes(model) / 1e6 for kind, model in models.items()}}
            row["moe_time_over_dense"] = row["dense_tokens_per_s"] / row["moe_tokens_per_s"]
            rows.append(row)
            print(f"{precision} {mode}: dense {row['dense_tokens_per_s']:.1f}, moe {row['moe_tokens_per_s']:.1f} "
                  "tokens/s", file=sys.stderr, flush=True)

    print(f"| precision | mode | dense tok/s | MoE {args.experts}x, top-{args.per_token} tok/s | MoE step / dense step "
          "| MB read per token (dense / MoE) |")
    print("| --- " * 6 + "|")
    for row in rows:
        print(f"| {row['precision']} | {row['mode']} | {row['dense_tokens_per_s']:.1f} | {row['moe_tokens_per_s']:.1f} "
              f"| {row['moe_time_over_dense']:.2f}x | {row['dense_active_mb']:.0f} / {row['moe_active_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "experts": args.experts, "per_token": args.per_token,
                                         "torch": torch.__version__, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
