"""Measure brisk on a CUDA GPU against gpt-fast's published figures, in one run:

1. the GPU's copy bandwidth: a device-to-device copy of --copy_gb, counting the bytes read and written;
2. `generate.py --random_weights SHAPE --random_format F --compile` for Llama-2-7B's shape (--shapes) with
   its linear layers in bf16, int8 and int4 (groups of 32 and 128), batch 1, --max_new_tokens tokens:
   decode tokens/s, the memory bandwidth that implies, and its share of the copy bandwidth;
3. scripts/bench_serve.py against `serve.py --compile` with --slots slots and as many clients, for
   --serve_seconds (SmolLM2 when it is converted, else random weights of its shape: the speed is the same).

Prints one Markdown table (the CUDA tests' outcome too, given their --junit file) and writes it with the
figures as JSON. scripts/gpu_check.sh runs the tests, then this.

    python scripts/bench_gpu.py --json gpu.json --markdown gpu.md
    python scripts/bench_gpu.py --shapes Llama-2-7B Llama-3.1-8B --formats float int4-g32
    python scripts/bench_gpu.py --device cpu --shapes stories15M --parts decode   # a dry run without a GPU

The prompt is encoded with --tokenizer_from's tokenizer (random weights print no text).
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from checkpoint import RANDOM_WEIGHTS  # noqa: E402
from cli import DEFAULT_CHECKPOINT  # noqa: E402
from scripts.random_checkpoint import write as write_random_checkpoint  # noqa: E402

PARTS = ("copy", "decode", "serve")
FORMATS = ("float", "int8", "int4-g32", "int4-g128")
# gpt-fast's README, Llama-2-7B at batch 1 (tokens/s): A100 80GB, and H100 on its GQA branch; A100 GB/s
GPT_FAST = {"float": dict(a100=104.9, a100_gbs=1397, h100=146.7), "int8": dict(a100=155.6, a100_gbs=1069, h100=233.5),
            "int4-g32": dict(a100=196.8, a100_gbs=862, h100=267.1)}
A100_GBS = 2039  # the A100 80GB's specified bandwidth, which gpt-fast's shares are of
# decode bandwidth targets, as shares of this GPU's measured copy bandwidth
TARGET_SHARE = {"float": 0.70, "int8": 0.60, "int4-g32": 0.50, "int4-g128": 0.50}
REPORT = re.compile(r"decode (\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s; memory bandwidth ([\d.]+) GB/s "
                    r"\(weights (\d+) MB \+ KV cache (\d+) MB.*; peak memory ([\d.]+) GB")
SERVE_SHAPE = "SmolLM2-135M"


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: str, gigabytes: float, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by a copy of `gigabytes` on device, best of repeats (after a
    warm-up copy); the memory is handed back before returning."""
    source = torch.ones(int(gigabytes * 1e9), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for repeat in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        if repeat:
            best = min(best, time.perf_counter() - started)
    del source, target
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * gigabytes / best


def run(command: list, timeout_s: float) -> subprocess.CompletedProcess:
    """A command in the project's root; a timeout reads as a failed run, not an exception."""
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(command, 124, expired.stdout or "", f"timed out after {timeout_s:.0f} s")


def failure(result: subprocess.CompletedProcess) -> str:
    """The last line a failed run wrote, to stand in the table for its figures."""
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return f"failed (exit {result.returncode}): {lines[-1][:200] if lines else 'no output'}"


def decode_row(args, shape: str, random_format: str) -> dict:
    """generate.py over random weights, compiled: the mean of its --samples samples (compiling excluded)."""
    command = [sys.executable, "generate.py", "--random_weights", shape, "--random_format", random_format,
               "--checkpoint_path", str(args.tokenizer_from), "--device", args.device, "--compile",
               "--max_new_tokens", str(args.max_new_tokens), "--num_samples", str(args.samples)]
    started = time.perf_counter()
    result = run(command, args.timeout)
    row = {"part": "decode", "shape": shape, "format": random_format, "wall_s": time.perf_counter() - started}
    samples = REPORT.findall(result.stderr)
    if result.returncode != 0 or not samples:
        return {**row, "error": failure(result)}
    loaded = re.search(r"\((torch\.\w+), \w+\) in", result.stderr)
    compiled = re.search(r"compiled in ([\d.]+) s", result.stderr)
    return {**row, "dtype": loaded.group(1) if loaded else "?",
            "compile_s": float(compiled.group(1)) if compiled else None,
            "tokens_per_s": statistics.fmean(float(s[2]) for s in samples),
            "bandwidth_gbs": statistics.fmean(float(s[3]) for s in samples),
            "weights_mb": int(samples[-1][4]), "kv_cache_mb": int(samples[-1][5]),
            "peak_memory_gb": float(samples[-1][6])}


def serve_checkpoint(args, scratch: Path) -> tuple:
    """The checkpoint to serve and what it is: --serve_checkpoint's file, else random weights of SmolLM2's shape."""
    if args.serve_checkpoint.is_file():
        return args.serve_checkpoint, args.serve_checkpoint.parent.name
    path = write_random_checkpoint(SERVE_SHAPE, scratch / f"random-{SERVE_SHAPE}", args.tokenizer_from, torch.float32)
    return path, f"random {SERVE_SHAPE} weights"


def serve_row(args) -> dict:
    """bench_serve.py's closed loop, one client per slot, greedy, for --serve_seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, model = serve_checkpoint(args, Path(scratch))
        output = Path(scratch) / "serve.json"
        command = [sys.executable, "scripts/bench_serve.py", "--engines", "brisk-fcfs", "--device", args.device,
                   "--compile", "--checkpoint_path", str(checkpoint), "--slots", str(args.slots), "--clients",
                   str(args.slots), "--requests", str(max(100, int(200 * args.serve_seconds))), "--duration",
                   str(args.serve_seconds), "--max_seq_length", "1024", "--json", str(output)]
        result = run(command, args.serve_seconds + args.timeout)
        row = {"part": "serve", "model": model, "slots": args.slots, "seconds": args.serve_seconds}
        if result.returncode != 0 or not output.exists():
            return {**row, "error": failure(result)}
        [figures] = json.loads(output.read_text())["results"]
    return {**row, **figures}


def tests_row(junit: Path) -> dict:
    """The outcome of the CUDA tests from pytest's --junitxml file."""
    root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"part": "tests", **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed_tests": failed}


def machine(device: str) -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": device}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 1e9, 1),
                    multiprocessors=properties.multi_processor_count, cuda=torch.version.cuda)
    return info


def share(gbs: float, copy_gbs) -> str:
    return f"{gbs / copy_gbs:.0%}" if copy_gbs else "-"


def table(rows: list, copy_gbs) -> list:
    """One Markdown table of every row: what was measured, its figures, and what it is held against."""
    lines = ["| part | configuration | tokens/s | GB/s | share of copy bandwidth | target | against |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["part"] == "copy":
            lines.append(f"| copy | {row['gigabytes']:g} GB device to device (read + written) | - | {row['gbs']:.0f} | "
                         "100% | - | an H200 copies about 4300 GB/s |")
        elif row["part"] == "decode":
            configuration = f"{row['shape']} {row['format']}, batch 1, compiled"
            if "error" in row:
                lines.append(f"| decode | {configuration} | {row['error']} | | | | |")
                continue
            peer = GPT_FAST.get(row["format"]) if row["shape"] == "Llama-2-7B" else None
            against = (f"gpt-fast A100 {peer['a100']} ({peer['a100_gbs'] / A100_GBS:.0%} of {A100_GBS} GB/s), "
                       f"H100 {peer['h100']}" if peer else "-")
            target = f">= {TARGET_SHARE[row['format']]:.0%}" if row["format"] in TARGET_SHARE else "-"
            lines.append(f"| decode | {configuration}, {row['dtype'].removeprefix('torch.')} activations, "
                         f"{row['weights_mb']:,} MB of weights | {row['tokens_per_s']:.1f} | "
                         f"{row['bandwidth_gbs']:.0f} | {share(row['bandwidth_gbs'], copy_gbs)} | {target} | "
                         f"{against} |")
        elif row["part"] == "serve":
            configuration = f"serve.py {row['model']}, {row['slots']} slots and clients, {row['seconds']:g} s"
            if "error" in row:
                lines.append(f"| serve | {configuration} | {row['error']} | | | | |")
                continue
            lines.append(f"| serve | {configuration}: {row['requests']} requests, {row['failed']} failed | "
                         f"{row['tokens_per_s']:.0f} | - | - | - | TTFT p50 / p99 {row['short_ttft_p50'] * 1e3:.0f} / "
                         f"{row['short_ttft_p99'] * 1e3:.0f} ms, ITL p50 {row['short_itl_p50'] * 1e3:.1f} ms |")
        else:
            failed = f": {', '.join(row['failed_tests'])}" if row["failed_tests"] else ""
            lines.append(f"| tests | pytest -m cuda | {row['passed']} passed, {row['failures'] + row['errors']} "
                         f"failed, {row['skipped']} skipped{failed} | | | | every CUDA test passes |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", nargs="+", default=["Llama-2-7B"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=RANDOM_WEIGHTS)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--samples", type=int, default=3, help="generate.py --num_samples (their mean is reported)")
    parser.add_argument("--copy_gb", type=float, default=4.0)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--serve_seconds", type=float, default=120)
    parser.add_argument("--serve_checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the weights file to serve "
                        "(default: the embedded SmolLM2's; where it is missing, random weights of its shape)")
    parser.add_argument("--tokenizer_from", type=Path, default=DEFAULT_CHECKPOINT.parent,
                        help="a checkpoint directory whose tokenizer encodes the prompt (its weights are not read)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one generate.py run (or the server's "
                        "start) may take")
    parser.add_argument("--junit", type=Path, help="pytest's --junitxml file of the CUDA tests, to report beside")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is available (a dry run: --device cpu)", file=sys.stderr)
        return 2
    rows = [tests_row(args.junit)] if args.junit and args.junit.is_file() else []
    copy_gbs = None
    if "copy" in args.parts:
        copy_gbs = copy_bandwidth_gbs(args.device, args.copy_gb)
        rows.append({"part": "copy", "gigabytes": args.copy_gb, "gbs": copy_gbs})
    if "decode" in args.parts:
        for shape in args.shapes:
            for random_format in args.formats:
                rows.append(decode_row(args, shape, random_format))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if "serve" in args.parts:
        rows.append(serve_row(args))
    for row in rows:
        if copy_gbs and "bandwidth_gbs" in row:
            row["share_of_copy_bandwidth"] = row["bandwidth_gbs"] / copy_gbs
    info = machine(args.device)
    lines = [f"{info.get('gpu', args.device)}, torch {info['torch']}, {info['date']}", "", *table(rows, copy_gbs)]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
