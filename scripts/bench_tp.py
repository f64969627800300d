"""Tensor-parallel decoding speed and memory per rank, for several world sizes on this machine.

    python scripts/bench_tp.py --world_sizes 1 3                         # the default SmolLM2
    python scripts/bench_tp.py --checkpoint_path checkpoints/random-SmolLM2-1.7B --world_sizes 1 2

Each world size is a fresh `torchrun --standalone --nproc_per_node N generate.py` run, greedy, with
the figures generate.py reports on rank 0's stderr. torchrun gives each process one thread
(OMP_NUM_THREADS=1) when N > 1 unless --threads_per_rank says otherwise.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = re.compile(r"decode (\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s; memory bandwidth ([\d.]+) GB/s "
                    r"\(weights (\d+) MB .*peak memory ([\d. /]+) GB")


def run(checkpoint: Path, ranks: int, args) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "generate.py", "--checkpoint_path", str(checkpoint), "--prompt", args.prompt, "--temperature", "0",
               "--max_new_tokens", str(args.max_new_tokens), "--num_samples", str(args.num_samples),
               *(["--compile"] if args.compile else [])]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads_per_rank)} if args.threads_per_rank else {}))
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    found = REPORT.findall(finished.stderr)
    if finished.returncode or not found:
        raise SystemExit(f"world size {ranks} failed:\n{finished.stderr[-4000:]}")
    tokens, seconds, tokens_per_s, bandwidth, weights_mb, memory = found[-1]  # the last sample
    return dict(ranks=ranks, tokens_per_s=float(tokens_per_s), weights_mb_per_rank=int(weights_mb),
                bandwidth_per_rank=float(bandwidth), peak_gb=memory.strip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--prompt", default="The history of the printing press")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=2, help="the first sample is a warm-up")
    parser.add_argument("--threads_per_rank", type=int)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    print(f"{args.checkpoint_path}, {os.cpu_count()} CPU cores{', compiled' if args.compile else ''}")
    print("| ranks | tokens/s | weights per rank | bandwidth per rank | peak memory per rank |")
    print("|---|---|---|---|---|")
    rows = []
    for ranks in args.world_sizes:
        rows.append(run(args.checkpoint_path, ranks, args))
        row = rows[-1]
        print(f"| {ranks} | {row['tokens_per_s']:.1f} | {row['weights_mb_per_rank']} MB | "
              f"{row['bandwidth_per_rank']:.1f} GB/s | {row['peak_gb']} GB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint_path), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
