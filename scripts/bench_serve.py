"""Load test of OpenAI-compatible servers on the same model: brisk's serve.py with its two schedulers (mlfq,
fcfs), llama.cpp's own server (llama-server, --slots parallel slots) and llama-cpp-python's server (one
request at a time) on the embedded SmolLM2 GGUF, each started here on 127.0.0.1 and stopped after its runs.

    pip install -r requirements-bench.txt
    python scripts/bench_serve.py --rates 0.5 1 --requests 40 --prompt_file my_text.txt
    python scripts/bench_serve.py --clients 8 --requests 32          # closed loop: 8 clients back to back

llama-server is built the first time from the llama.cpp tree that llama-cpp-python's source distribution
vendors (pip downloads it; cmake and a C++ compiler build it, several minutes on 2 cores) into
$BRISK_CACHE_DIR; CMAKE_ARGS passes flags to its cmake (requirements-bench.txt: the ones a CPU with AMX needs).

Open loop (--rates): requests arrive as a Poisson process at each rate (requests/s), a mix of short ones
(a 24-word prompt, 16 tokens) and long ones (a 300-word prompt, 128 tokens; --long_share of them), the same
sequence for every server. Closed loop (--clients N): N clients each send their next request as soon as the
last one is answered. Every request streams, greedy, past the end-of-text token where the server allows it
(`ignore_eos`). Recorded per request: time to first token (TTFT), time per output token after the first
(TPOT), the gaps between streamed tokens (ITL) and end-to-end latency; per run: output tokens/s, and goodput
(requests/s that met --slo_ttft and --slo_tpot). --uniform WORDS TOKENS makes every request alike. Prompts
come from --prompt_file (any text), else from a built-in paragraph.

Chats (--chat_turns N): --clients clients at once (default 4), each holding a chat of N turns that starts
with --history_words words of the text and a question, each next turn adding the answer and a follow-up, as a
chat client resends the whole conversation; per turn, the time to first token and the prompt tokens the
server reused (a server with prefix reuse, brisk's or llama-server's cache_prompt, prefills only what is new).

    python scripts/bench_serve.py --engines brisk-mlfq llama-server --chat_turns 5 --prompt_file book.txt
"""
import argparse
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from aot_step import default_cache_dir  # noqa: E402
from cli import DEFAULT_CHECKPOINT  # noqa: E402
from scripts.prepare_default import embedded_gguf  # noqa: E402

FALLBACK_TEXT = (
    "The sea was calm that morning, and the fishing boats drifted out of the harbour one by one while the gulls "
    "circled above the nets. Old Tomas mended a sail on the quay and told anyone who would listen how the storm "
    "of his youth had carried away the lighthouse keeper's roof, the church bell and half of the village's "
    "patience. Children raced along the sea wall, counting the waves that broke over the rocks, and the baker "
    "left loaves to cool on the window sill where the cat pretended not to notice them. ") * 8
KINDS = {"short": (24, 16), "long": (300, 128)}  # prompt words, max_tokens (--uniform adds "uniform")


@dataclass
class Job:
    kind: str
    prompt: str
    max_tokens: int
    at: float = 0.0  # seconds after the run's start (open loop)
    result: dict = field(default_factory=dict)


def workload(text: str, count: int, long_share: float, rate: float, seed: int) -> list:
    """The same requests for every server: kinds, prompts (windows of the text) and Poisson arrival times.
    long_share None: every request of the kind "uniform"."""
    rng, words, at, jobs = random.Random(seed), text.split(), 0.0, []
    for _ in range(count):
        kind = "uniform" if long_share is None else "long" if rng.random() < long_share else "short"
        length, max_tokens = KINDS[kind]
        start = rng.randrange(max(1, len(words) - length))
        jobs.append(Job(kind, " ".join(words[start:start + length]), max_tokens, at))
        at += rng.expovariate(rate) if rate > 0 else 0.0
    return jobs


def stream(port: int, path: str, body: dict, timeout_s: float) -> dict:
    """POST one streamed request; when each piece of text came, the text, the usage, or what went wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    started, times, text, usage = time.perf_counter(), [], "", None
    try:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"ok": False, "status": response.status}
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            choice = (chunk.get("choices") or [{}])[0]
            piece = choice.get("text") or (choice.get("delta") or {}).get("content")
            if piece:
                times.append(time.perf_counter())
                text += piece
    except (OSError, http.client.HTTPException) as error:
        return {"ok": False, "error": str(error)}
    finally:
        connection.close()
    if not times:
        return {"ok": False, "error": "no text"}
    return {"ok": True, "started": started, "ended": time.perf_counter(), "times": times, "text": text,
            "usage": usage}


def send(port: int, job: Job, timeout_s: float) -> dict:
    """Stream one completion; what it took."""
    body = {"prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "ignore_eos": True}
    result = stream(port, "/v1/completions", body, timeout_s)
    if not result["ok"]:
        return {"kind": job.kind, **result}
    times, started, ended = result["times"], result["started"], result["ended"]
    tokens = result["usage"]["completion_tokens"] if result["usage"] else len(times)
    return {"kind": job.kind, "ok": True, "tokens": tokens, "ttft": times[0] - started, "e2e": ended - started,
            "tpot": (ended - times[0]) / max(tokens - 1, 1), "itl": [b - a for a, b in zip(times, times[1:])]}


def chat(port: int, history: str, turns: int, max_tokens: int, timeout_s: float) -> list:
    """One client's chat: the history and a question, then turns - 1 follow-ups, each with every earlier turn
    (what a chat client sends); each turn's time to first token and the prompt tokens the server says it reused
    (None where it does not say)."""
    messages, results = [{"role": "user", "content": history + "\n\nWhat is this text about?"}], []
    for turn in range(turns):
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        result = stream(port, "/v1/chat/completions", body, timeout_s)
        if not result["ok"]:
            results.append({"ok": False, **result})
            break
        usage = result["usage"] or {}
        results.append({"ok": True, "ttft": result["times"][0] - result["started"],
                        "prompt_tokens": usage.get("prompt_tokens"),
                        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")})
        messages += [{"role": "assistant", "content": result["text"]},
                     {"role": "user", "content": f"Tell me more about part {turn + 2}."}]
    return results


def run_chats(port: int, text: str, clients: int, turns: int, history_words: int, max_tokens: int,
              timeout_s: float) -> list:
    """clients chats at once, each over its own window of the text: each client's turns."""
    words, results = text.split(), [None] * clients

    def client(index):
        start = index * len(words) // clients % max(1, len(words) - history_words)
        results[index] = chat(port, " ".join(words[start:start + history_words]), turns, max_tokens, timeout_s)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * turns)
    return results


def run_open_loop(port: int, jobs: list, timeout_s: float, duration_s: float = float("inf")) -> float:
    """Send each job at its arrival time, each on a thread of its own, none that arrives after duration_s;
    the run's wall time."""
    started = time.perf_counter()

    def client(job):
        if job.at > duration_s:
            return
        time.sleep(max(0.0, started + job.at - time.perf_counter()))
        job.result = send(port, job, timeout_s)

    threads = [threading.Thread(target=client, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + jobs[-1].at)
    return time.perf_counter() - started


def run_closed_loop(port: int, jobs: list, clients: int, timeout_s: float, duration_s: float = float("inf")) -> float:
    """clients threads, each sending the next unsent job as soon as its last one is answered, until the jobs
    or duration_s run out."""
    pending, lock, started = list(jobs), threading.Lock(), time.perf_counter()

    def client():
        while True:
            with lock:
                if not pending or time.perf_counter() - started > duration_s:
                    return
                job = pending.pop(0)
            job.result = send(port, job, timeout_s)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * len(jobs))
    return time.perf_counter() - started


def percentile(values: list, p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(jobs: list, wall_s: float, slo_ttft: float, slo_tpot: float) -> dict:
    """Figures of the jobs that were sent (all of them, unless --duration ended the run first)."""
    sent = [job for job in jobs if job.result]
    done = [job.result for job in sent if job.result.get("ok")]
    good = [r for r in done if r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot]
    figures = {"requests": len(sent), "failed": len(sent) - len(done), "wall_s": wall_s,
               "tokens_per_s": sum(r["tokens"] for r in done) / wall_s, "goodput_per_s": len(good) / wall_s}
    for kind in KINDS:
        results = [r for r in done if r["kind"] == kind]
        for name in ("ttft", "tpot", "e2e"):
            values = [r[name] for r in results]
            figures[f"{kind}_{name}_mean"] = statistics.fmean(values) if values else float("nan")
            figures[f"{kind}_{name}_p50"] = percentile(values, 50)
            figures[f"{kind}_{name}_p99"] = percentile(values, 99)
        itl = [gap for r in results for gap in r["itl"]]
        figures[f"{kind}_itl_p50"], figures[f"{kind}_itl_p99"] = percentile(itl, 50), percentile(itl, 99)
    itl = [gap for r in done for gap in r["itl"]]
    figures["itl_p50"], figures["itl_p99"] = percentile(itl, 50), percentile(itl, 99)
    return figures


def table_row(engine: str, kind: str, load: float, f: dict) -> str:
    """A run's line of the printed table: the first kind's first token, each kind's end to end, every
    request's token gaps."""
    first = next(iter(KINDS))
    ends = " | ".join(f"{f[f'{k}_e2e_mean']:.2f} / {f[f'{k}_e2e_p99']:.2f}" for k in KINDS)
    return (f"| {engine} | {kind} {load:g} | {f['tokens_per_s']:.1f} | {f['goodput_per_s']:.2f} | "
            f"{f[f'{first}_ttft_p50']:.2f} / {f[f'{first}_ttft_p99']:.2f} | {ends} | "
            f"{f['itl_p50']:.3f} / {f['itl_p99']:.3f} | {f['failed']} |")


def print_chats(engine: str, chats: list):
    """Each turn's time to first token (median and slowest over the clients) and reused prompt tokens."""
    print(f"\n{engine}: chats of {len(chats)} clients\n\n| turn | first token p50 / max s | prompt tokens | "
          "reused (cached_tokens) | failed |\n| --- | --- | --- | --- | --- |")
    for turn in range(max(len(turns) for turns in chats)):
        results = [turns[turn] for turns in chats if len(turns) > turn]
        done = [r for r in results if r["ok"]]
        ttft = [r["ttft"] for r in done]
        prompt = [r["prompt_tokens"] for r in done if r["prompt_tokens"] is not None]
        cached = [r["cached_tokens"] for r in done if r["cached_tokens"] is not None]
        first_token = f"{statistics.median(ttft):.2f} / {max(ttft):.2f}" if ttft else "-"
        print(f"| {turn + 1} | {first_token} | " + (f"{statistics.fmean(prompt):.0f}" if prompt else "-") + " | "
              + (f"{statistics.fmean(cached):.0f}" if cached else "not said") + f" | {len(results) - len(done)} |",
              flush=True)


def plot(results: list, path: Path):
    """Short and long requests' mean and p99 end-to-end latency at each load, a line per server (matplotlib,
    from requirements-bench.txt)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, kind in zip(axes, KINDS):
        for engine in dict.fromkeys(r["engine"] for r in results):
            runs = [r for r in results if r["engine"] == engine]
            loads = [r.get("rate", r.get("clients")) for r in runs]
            for stat, style in (("mean", "-o"), ("p99", "--x")):
                axis.plot(loads, [r[f"{kind}_e2e_{stat}"] for r in runs], style, label=f"{engine} {stat}")
        axis.set(title=f"{kind} requests", xlabel="load (requests/s, or clients)", ylabel="end to end, s")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LLAMA_CPP_PYTHON = "0.3.36"  # the source distribution llama-server is built from (requirements-bench.txt's)


def llama_server() -> Path:
    """llama.cpp's server binary, built once (tools/server of the llama.cpp tree in llama-cpp-python's source
    distribution) into the cache directory, under a temporary name until it is complete."""
    binary = default_cache_dir() / f"llama-server-{LLAMA_CPP_PYTHON}"
    if binary.exists():
        return binary
    print(f"building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON}'s sources into {binary} (minutes)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", work], check=True)
        with tarfile.open(next(Path(work).glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(work, filter="data")
        source, build = Path(work) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp", Path(work) / "b"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DBUILD_SHARED_LIBS=OFF", *shlex.split(os.environ.get("CMAKE_ARGS", ""))],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count())],
                       check=True, stdout=subprocess.DEVNULL)
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(binary.name + ".partial")
        shutil.copy(build / "bin" / "llama-server", partial)
        os.replace(partial, binary)
    return binary


def start_server(engine: str, port: int, args, brisk_flags: tuple = ()) -> subprocess.Popen:
    """One server on 127.0.0.1:port, of the flags server_flags added (brisk_flags: more of serve.py's)."""
    if engine == "llama-server":  # --slots slots, each with --max_seq_length tokens of context
        command = [str(llama_server()), "--model", str(embedded_gguf()), "--host", "127.0.0.1", "--port", str(port),
                   "--parallel", str(args.slots), "--ctx-size", str(args.slots * args.max_seq_length),
                   "--threads", str(args.threads), "--threads-batch", str(args.threads), "--no-webui"]
    elif engine == "llama-cpp":
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--host", "127.0.0.1",
                   "--port", str(port), "--n_ctx", str(args.max_seq_length), "--n_threads", str(args.threads),
                   "--n_threads_batch", str(args.threads), "--interrupt_requests", "False"]
    else:
        _, schedule, *chunk = engine.split("-")  # brisk-mlfq, or brisk-mlfq-64: chunks of 64 beside decoding
        command = [sys.executable, "serve.py", "--port", str(port), "--slots", str(args.slots), "--schedule",
                   schedule, "--max_seq_length", str(args.max_seq_length), "--max_waiting", "100000",
                   "--checkpoint_path", str(args.checkpoint_path), "--device", args.device,
                   *(["--compile"] if args.compile else []),
                   *(["--mixed_chunk", chunk[0]] if chunk else []), *brisk_flags]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def stop_server(process: subprocess.Popen):
    """Ctrl-C, as a user stops it; killed if it has not stopped within a minute."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def server_flags(parser: argparse.ArgumentParser):
    """The flags start_server reads: which model, slots, context, device and threads."""
    parser.add_argument("--slots", type=int, default=8, help="brisk's --slots, llama-server's --parallel")
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="brisk's checkpoint (llama.cpp's servers run the embedded GGUF)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="brisk's --device")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="brisk's decode step compiled")
    parser.add_argument("--max_seq_length", type=int, default=2048)


def wait_ready(port: int, path: str, process: subprocess.Popen, timeout_s: float):
    """Until GET path answers 200: brisk's and llama-server's /health (503 while they load), llama-cpp-python's
    /v1/models."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server on port {port} did not come up in {timeout_s:.0f} s")


def engine_name(name: str) -> str:
    if not re.fullmatch(r"brisk-(mlfq|fcfs)(-[1-9][0-9]*)?|llama-server|llama-cpp", name):
        raise argparse.ArgumentTypeError(f"{name}: use brisk-mlfq, brisk-fcfs (either with a prompt chunk beside "
                                         "decoding: brisk-mlfq-64), llama-server or llama-cpp")
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["brisk-mlfq", "brisk-fcfs", "llama-server"],
                        type=engine_name, help="brisk-mlfq, brisk-fcfs (a suffix sets brisk's --mixed_chunk: "
                        "brisk-mlfq-64), llama-server, llama-cpp")
    parser.add_argument("--rates", nargs="*", type=float, default=[0.5, 1.0], help="open loop: requests/s")
    parser.add_argument("--clients", type=int, help="closed loop with this many clients instead of --rates")
    parser.add_argument("--requests", type=int, default=40, help="requests per run")
    parser.add_argument("--long_share", type=float, default=0.2, help="share of long requests")
    parser.add_argument("--uniform", nargs=2, type=int, metavar=("WORDS", "TOKENS"),
                        help="every request alike instead: a prompt of WORDS words, TOKENS tokens")
    server_flags(parser)
    parser.add_argument("--duration", type=float, help="seconds after which a run sends no new request")
    parser.add_argument("--prompt_file", type=Path, help="text the prompts are cut from (default: built in)")
    parser.add_argument("--slo_ttft", type=float, default=2.0, help="goodput: time to first token, seconds")
    parser.add_argument("--slo_tpot", type=float, default=0.5, help="goodput: time per output token, seconds")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat_turns", type=int, help="instead of a load: --clients chats (default 4) of this many "
                        "turns each, over a history of --history_words words")
    parser.add_argument("--history_words", type=int, default=750, help="a chat's first message, in words")
    parser.add_argument("--chat_tokens", type=int, default=32, help="tokens of each chat answer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="a PNG of end-to-end latency against load")
    args = parser.parse_args(argv)
    text = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else FALLBACK_TEXT
    if args.uniform:
        KINDS.clear()
        KINDS["uniform"] = tuple(args.uniform)
    loads = [("clients", args.clients)] if args.clients else [("rate", rate) for rate in args.rates]
    if not args.chat_turns:
        ends = " | ".join(f"{kind} e2e mean / p99" for kind in KINDS)
        print(f"| engine | load | tok/s | goodput req/s | {next(iter(KINDS))} TTFT p50 / p99 | {ends} | "
              "ITL p50 / p99 | failed |")
        print("| --- " * (7 + len(KINDS)) + "|")
    results = []
    for engine in args.engines:
        port = free_port()
        server = start_server(engine, port, args)
        try:
            wait_ready(port, "/v1/models" if engine == "llama-cpp" else "/health", server, 600)
            if args.chat_turns:
                chats = run_chats(port, text, args.clients or 4, args.chat_turns, args.history_words,
                                  args.chat_tokens, args.timeout)
                results.append({"engine": engine, "chats": chats})
                print_chats(engine, chats)
                continue
            for kind, load in loads:
                jobs = workload(text, args.requests, None if args.uniform else args.long_share,
                                load if kind == "rate" else 0, args.seed)
                duration = args.duration or float("inf")
                wall = (run_open_loop(port, jobs, args.timeout, duration) if kind == "rate"
                        else run_closed_loop(port, jobs, load, args.timeout, duration))
                figures = {"engine": engine, kind: load, **summary(jobs, wall, args.slo_ttft, args.slo_tpot)}
                results.append(figures)
                print(table_row(engine, kind, load, figures), flush=True)
        finally:
            stop_server(server)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
