"""brisk's CPU kernels (cpu_kernels.cpp) per call against PyTorch's own CPU int4 kernel, on SmolLM2-135M's
three weight shapes (1536 x 576, 576 x 1536, 49152 x 576) in int4 groups of 32 (the Q4_1 file's layers) and
int8 in groups of 32 (its Q8_0 output head), for 1 and 8 rows of activations; and the float kernel over fp32
and bf16 weights against torch's linear. Each call multiplies another
copy of the weight, the copies together larger than the L3 cache, so the weights come from memory as they do
in a decode step. Printed: microseconds per call (the best of --repeats passes over the copies) and the GB/s
of weight bytes (values and scales) that implies; PyTorch's kernel with bf16 activations (fp32 ones run many
times slower through it).

    python scripts/bench_kernels.py
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpu_kernels import kernel_scales, kernel_weight, native_kernels  # noqa: E402
from quantized_layers import Int4Linear, Int8Linear, unpack_int4  # noqa: E402
from quantize import set_rtn  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (49152, 576)]


def per_call_us(call, copies: list, repeats: int) -> float:
    """The best over repeats of the mean time of call(copy) over every copy, in microseconds."""
    for copy in copies[:2]:
        call(copy)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for copy in copies:
            call(copy)
        best = min(best, (time.perf_counter() - started) / len(copies))
    return best * 1e6


def torch_int4_weight(layer: Int4Linear):
    """(weight, groupsize, scales_and_zeros) in the layout of aten._weight_int4pack_mm_for_cpu."""
    values = unpack_int4(layer.weight, layer.groupsize).to(torch.int32)
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2), layer.groupsize,
            layer.kernel_scales_and_zeros().bfloat16())


def bench_shape(out_features: int, in_features: int, rows: int, args) -> list:
    weight = torch.randn(out_features, in_features) * 0.02
    layers = {"int4-g32": Int4Linear(in_features, out_features, 32),
              "int8-g32": Int8Linear(in_features, out_features, 32)}
    for layer in layers.values():
        set_rtn(layer, weight)
    results = []
    for kind, layer in layers.items():
        weight, scales = kernel_weight(layer), kernel_scales(layer)
        nbytes = weight.numel() + scales.numel() * 2
        copies = [(weight.clone(), scales.clone()) for _ in range(max(2, int(args.cycle_bytes // nbytes)))]
        x = torch.randn(rows, in_features)
        op = torch.ops.brisk.int4_linear if kind.startswith("int4") else torch.ops.brisk.int8_linear
        times = {"brisk": per_call_us(lambda copy: op(x, *copy, 32, out_features), copies, args.repeats)}
        if kind.startswith("int4"):
            torch_copies = [torch_int4_weight(layer) for _ in range(max(2, len(copies) // 2))]
            x_bf16 = x.bfloat16()
            times["torch int4 (bf16)"] = per_call_us(
                lambda copy: torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, *copy), torch_copies, args.repeats)
        results += report(out_features, in_features, kind, rows, times, nbytes)
    return results


def bench_float_shape(out_features: int, in_features: int, rows: int, args) -> list:
    """brisk::float_linear (fp32 activations) against torch's linear (activations in the weight's dtype) for
    an fp32 and a bf16 weight."""
    results = []
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        weight = (torch.randn(out_features, in_features) * 0.02).to(dtype)
        nbytes = weight.numel() * weight.element_size()
        copies = [weight.clone() for _ in range(max(2, int(args.cycle_bytes // nbytes)))]
        x = torch.randn(rows, in_features)
        x_like = x.to(dtype)
        times = {"brisk": per_call_us(lambda copy: torch.ops.brisk.float_linear(x, copy), copies, args.repeats),
                 "torch linear": per_call_us(lambda copy: torch.nn.functional.linear(x_like, copy), copies,
                                             args.repeats)}
        results += report(out_features, in_features, kind, rows, times, nbytes)
    return results


def report(out_features: int, in_features: int, kind: str, rows: int, times: dict, nbytes: int) -> list:
    """Print a table row for each engine's time; the rows as dicts, for --json."""
    results = []
    for engine, us in times.items():
        gb_per_s = nbytes / us / 1e3
        print(f"| {out_features} x {in_features} | {kind} | {rows} | {engine} | {us:.0f} | {gb_per_s:.1f} |",
              flush=True)
        results.append({"shape": [out_features, in_features], "format": kind, "rows": rows, "engine": engine,
                        "us_per_call": us, "weight_bytes": nbytes, "gb_per_s": gb_per_s})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cycle_bytes", type=float, default=256e6, help="weight bytes cycled through (> L3)")
    parser.add_argument("--isa", choices=["best", "avx2"], default="best", help="avx2: brisk's AVX2 path")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not native_kernels():
        return 2
    print(f"brisk's instructions: {torch.ops.brisk.cpu_isa(args.isa)}; threads: {torch.get_num_threads()}")
    print("| weight | format | rows | kernel | us per call | GB/s of weights |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = [row for rows in args.rows for shape in SHAPES for bench in (bench_shape, bench_float_shape)
               for row in bench(*shape, rows, args)]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
