"""Aggregate decode throughput of the serving engine (engine.py, no HTTP) against how many requests share it:
one request alone, then N requests at once in N slots, each the same short prompt continued for --tokens
tokens (greedy, past any stop token). The server issue's target: 8 slots at least 3x one request's tokens/s.
Eager, as `serve.py` runs without --compile. Sizes are interleaved over --repeats rounds; medians.

    python scripts/bench_slots.py                          # the default Q4_1 file, --dtype auto, 1 / 4 / 8 slots
    python scripts/bench_slots.py --slots 1 8 16 --tokens 128 --json slots.json
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_model, stored_weights  # noqa: E402
from cli import DEFAULT_CHECKPOINT  # noqa: E402
from engine import Engine, ModelRunner, Request  # noqa: E402
from prepare import activation_dtype, prepare  # noqa: E402
from scheduler import FirstComeFirstServed  # noqa: E402

PROMPT = list(range(1000, 1024))  # 24 tokens: prefill is a small part of each run


def tokens_per_second(model, slots: int, tokens: int) -> float:
    """Every slot's request generated, from submission to the last token: their tokens over the wall time."""
    engine = Engine(ModelRunner(model, slots, len(PROMPT) + tokens + 1), FirstComeFirstServed())
    requests = [Request(PROMPT, tokens) for _ in range(slots)]
    started = time.perf_counter()
    for request in requests:
        engine.submit(request)

    def stop_when_answered():
        try:
            for request in requests:
                while not isinstance(request.events.get(timeout=600), str):
                    pass
        finally:
            engine.stop()

    waiter = threading.Thread(target=stop_when_answered)
    waiter.start()
    engine.run()  # on the main thread, as serve.py runs it (why: docs/serving.md)
    waiter.join(600)
    return slots * tokens / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    dtype = activation_dtype(args.dtype, "cpu", "eager", stored_weights(args.checkpoint_path))
    model = prepare(load_model(args.checkpoint_path, "cpu", dtype), "cpu")
    tokens_per_second(model, 1, 4)  # warm-up
    speeds = {slots: [] for slots in args.slots}
    for _ in range(args.repeats):
        for slots in args.slots:
            speeds[slots].append(tokens_per_second(model, slots, args.tokens))
    alone = statistics.median(speeds[min(args.slots)])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.checkpoint_path}", file=sys.stderr)
    print(f"| requests in as many slots | tokens/s together | against {min(args.slots)} |")
    print("| --- | --- | --- |")
    for slots, runs in speeds.items():
        print(f"| {slots} | {statistics.median(runs):.1f} | {statistics.median(runs) / alone:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint_path), "tokens": args.tokens,
                                         "torch": torch.__version__, "tokens_per_s": speeds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
