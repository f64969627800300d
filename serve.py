"""The OpenAI-compatible server's command line: loads a model, builds the serving engine (engine.py) and puts
the HTTP API (api.py) in front of it.

    python serve.py                                   # the embedded SmolLM2 on http://127.0.0.1:8000
    python serve.py --slots 8 --api_key secret --compile
    torchrun --nproc_per_node=3 serve.py              # tensor parallel: 3 processes share each step (tp.py)

Under torchrun, rank 0 serves HTTP and runs the engine and its scheduler, and every other rank makes the same
model calls on its share of the weights and of the KV cache (follow).
"""
import argparse
import os
import signal
import sys
import threading
from datetime import timedelta

import torch

import quantized_kv_cache
import tp
from api import Limits, Server
from checkpoint import stored_weights
from cli import UsageError, fail, pick_device
from engine import Engine, ModelRunner, decode_logits
from generation import compile_step, slots_to_attend
from model import Transformer
from prepare import activation_dtype, prepare
from runtime import announce_cache, cache_rows_in_budget, checkpoint_tokenizer, load_checkpoint, model_flags
from scheduler import FirstComeFirstServed, SkipJoinMLFQ


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(parser, "compile the decode step (waits before serving)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, help="sequences decoded together (rows of the KV cache; default 4, or "
                        "as many as --memory_budget holds)")
    parser.add_argument("--max_seq_length", type=int, default=2048, help="prompt + completion tokens per slot")
    parser.add_argument("--prefill_chunk", type=int, default=256, help="prompt tokens prefilled per step while no "
                        "slot decodes")
    parser.add_argument("--mixed_chunk", type=int, default=32, help="prompt tokens prefilled per step beside "
                        "decoding slots, in one pass with their step: what those wait for between two tokens")
    parser.add_argument("--max_waiting", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--schedule", default="mlfq", choices=["mlfq", "fcfs"],
                        help="who gets the slots: FastServe's skip-join MLFQ with preemption, or first come "
                             "first served")
    parser.add_argument("--api_key", default=os.environ.get("BRISK_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $BRISK_API_KEY; none: open)")
    parser.add_argument("--memory_budget", help="memory the KV cache may take (each rank's, under torchrun), e.g. "
                        "500MB: as many slots of --max_seq_length as it holds (at most --slots, if given)")
    parser.add_argument("--cors_origin", help="let browser pages from this origin call the API (CORS), e.g. "
                        "http://localhost:3000, or '*' for any; default: none")
    parser.add_argument("--max_request_bytes", type=int, default=Limits.max_request_bytes,
                        help="larger request bodies get 413")
    parser.add_argument("--idle_timeout", type=float, default=Limits.idle_timeout_s,
                        help="seconds a connection may send or take nothing before it is closed")
    parser.add_argument("--max_connections", type=int, default=Limits.max_connections,
                        help="connections served at once; past them, 503")
    return parser.parse_args(argv)


def check_args(args):
    given_slots = 1 if args.slots is None else args.slots
    for flag, value, least in (("--slots", given_slots, 1), ("--max_seq_length", args.max_seq_length, 2),
                               ("--prefill_chunk", args.prefill_chunk, 1), ("--mixed_chunk", args.mixed_chunk, 1),
                               ("--max_waiting", args.max_waiting, 0),
                               ("--max_request_bytes", args.max_request_bytes, 1),
                               ("--max_connections", args.max_connections, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, not {value}")
    if not args.idle_timeout > 0:
        raise UsageError(f"--idle_timeout must be a number of seconds above 0, not {args.idle_timeout}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, not {args.port}")


def load(args) -> tuple:
    """The tokenizer, and the runner of the model (this rank's share of it under torchrun, with its KV cache type
    and decode step) over as many cache rows as --slots and --memory_budget give."""
    device = pick_device(args.device)
    step = "compiled" if args.compile else "eager"
    dtype = activation_dtype(args.dtype, device, step, stored_weights(args.checkpoint_path))
    tokenizer = checkpoint_tokenizer(args.checkpoint_path)
    model = prepare(quantized_kv_cache.use(load_checkpoint(args.checkpoint_path, device, dtype), args.kv_cache),
                    device, step)
    decode = compile_step(decode_logits, device) if args.compile else decode_logits
    max_seq_length = min(args.max_seq_length, model.args.max_seq_length)  # no longer than the model was trained for
    return tokenizer, ModelRunner(model, rows_within_budget(args, model, max_seq_length), max_seq_length, decode)


def rows_within_budget(args, model: Transformer, max_seq_length: int) -> int:
    """--slots, or with --memory_budget as many cache rows of max_seq_length as it holds (at most --slots)."""
    if not args.memory_budget:
        return args.slots or 4
    fits = cache_rows_in_budget(model, args.memory_budget, max_seq_length, args.kv_cache)
    return min(fits, args.slots or fits)


def build_engine(args) -> tuple:
    """The tokenizer and a warm engine (a compiled step compiled for every attention length it will use) with
    its scheduler."""
    tokenizer, runner = load(args)
    announce_cache(runner.model, args.kv_cache)
    if args.compile:
        warm_up(runner)
    scheduler = mlfq(runner, args.prefill_chunk) if args.schedule == "mlfq" else FirstComeFirstServed()
    return tokenizer, Engine(runner, scheduler, args.prefill_chunk, args.max_waiting, static_rows=args.compile,
                             mixed_chunk=args.mixed_chunk)


@torch.no_grad()
def warm_up(runner: ModelRunner):
    """Run the compiled step once at every attention length a request can reach (256, 512, ... slots), before
    the server says it is ready."""
    attended = slots_to_attend(1, runner.max_seq_length)
    runner.dummy_step(attended)
    while attended < runner.max_seq_length:
        attended = slots_to_attend(attended + 1, runner.max_seq_length)
        runner.dummy_step(attended)


def mlfq(runner: ModelRunner, prefill_chunk: int) -> SkipJoinMLFQ:
    """FastServe's scheduler with quanta from this machine: the smallest is one decode step over every row; a
    prompt's prefill takes its share of a full chunk's time (what the engine charges it while it prefills)."""
    step_seconds, chunk_seconds = runner.measure(prefill_chunk)
    return SkipJoinMLFQ(step_seconds, lambda length: length / prefill_chunk * chunk_seconds)


def serve(args) -> int:
    """Listen at once (/health answers 503 while loading), load, then serve until interrupted."""
    try:
        limits = Limits(args.max_request_bytes, args.idle_timeout, args.max_connections)
        server = Server((args.host, args.port), args.api_key, args.cors_origin, limits)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror}): pick another --port") from None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tokenizer, engine = build_engine(args)
    except UsageError:
        server.shutdown()
        raise
    name = args.checkpoint_path if args.checkpoint_path.is_dir() else args.checkpoint_path.parent
    server.tokenizer, server.model_name = tokenizer, name.name
    server.engine = engine
    print(f"serving {server.model_name} on http://{args.host}:{server.server_port}/v1 ({len(engine.rows)} slots)",
          file=sys.stderr, flush=True)
    # Ctrl-C stops the engine after its iteration (under torchrun, the other ranks with it), from a thread of its
    # own: the handler may run while this thread holds the engine's lock
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=engine.stop).start())
    # The engine loops on this thread, the one that loaded and measured the model. GNU OpenMP gives each thread
    # that opens parallel regions a team of its own, and once the teams' threads outnumber the cores, their
    # workers stop spinning between regions: on another thread every small parallel op of a step would wait
    # for a wake-up (docs/serving.md).
    engine.run()
    server.shutdown()
    return 0


def follow(args) -> int:
    """A rank other than 0 under torchrun: no HTTP, no scheduler; it makes each model call rank 0's engine makes
    (warm-up and measurement included), on its share, until rank 0 stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 says when to stop
    _, runner = load(args)
    runner.follow()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        # the other ranks wait in a collective for rank 0's next call as long as the server is idle: no timeout
        tp.init(pick_device(args.device), timeout=timedelta(days=365))
        tp.quiet_other_ranks()
        status = serve(args) if tp.rank() == 0 else follow(args)
    except UsageError as error:  # a rank that fails exits; torchrun then stops the others
        return fail(str(error))
    tp.finish()
    return status


if __name__ == "__main__":
    sys.exit(main())
