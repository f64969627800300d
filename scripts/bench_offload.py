"""Offloaded inference: speed, peak memory and bytes streamed per token, in memory vs --offload cpu vs
--offload disk, and the throughput curve of disk offload as the batch grows.

    python scripts/random_checkpoint.py SmolLM2-1.7B checkpoints/random-SmolLM2-1.7B    # 6.8 GB of fp32
    python scripts/bench_offload.py --checkpoint_path checkpoints/random-SmolLM2-1.7B --memory_budget 2GB

Every configuration is a fresh generate.py process (so its peak memory is its own), greedy, with the
figures generate.py reports; the prompts are numbered variations of one sentence.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = re.compile(r"decode (\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s.*?(?:streamed (\d+) MB per step, "
                    r"([\d.]+) MB per token)?; peak memory ([\d.]+) GB")


def run(checkpoint: Path, offload: str, batch: int, args) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as prompts:
        prompts.write("".join(f"Prompt number {i}: write about the history of the number {i}.\n"
                              for i in range(batch)))
        prompts.flush()
        command = [sys.executable, "generate.py", "--checkpoint_path", str(checkpoint), "--prompt_file", prompts.name,
                   "--temperature", "0", "--max_new_tokens", str(args.max_new_tokens), "--offload", offload]
        if offload != "none" and args.memory_budget:
            command += ["--memory_budget", args.memory_budget]
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    found = REPORT.search(finished.stderr)
    if finished.returncode or not found:
        raise SystemExit(f"--offload {offload} batch {batch} failed:\n{finished.stderr[-2000:]}")
    tokens, seconds, tokens_per_s, streamed_step, streamed_token, peak = found.groups()
    return dict(offload=offload, batch=batch, tokens_per_s=float(tokens_per_s), peak_gb=float(peak),
                streamed_mb_per_token=float(streamed_token or 0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--memory_budget", default="2GB")
    parser.add_argument("--modes", nargs="+", default=["none", "cpu", "disk"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--max_new_tokens", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"{args.checkpoint_path}, --memory_budget {args.memory_budget} for cpu / disk, "
          f"{args.max_new_tokens} new tokens per prompt")
    print("| offload | batch | tokens/s | peak memory | streamed per generated token |")
    print("|---|---|---|---|---|")
    rows = [(mode, 1) for mode in args.modes] + [("disk", batch) for batch in args.batch_sizes if batch > 1]
    for offload, batch in rows:
        row = run(args.checkpoint_path, offload, batch, args)
        print(f"| {offload} | {batch} | {row['tokens_per_s']:.2f} | {row['peak_gb']:.2f} GB | "
              f"{row['streamed_mb_per_token']:.1f} MB |", flush=True)


if __name__ == "__main__":
    main()
