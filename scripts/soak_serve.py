"""A soak of brisk's server (serve.py): --clients clients back to back for --seconds, each request one of
every kind a server meets: malformed (10%: bad JSON, wrong types, `n` of 30, a missing prompt, a schema of an
unknown type), oversized (5%: a body announced past the server's cap), stalled (5%: half a body, then
nothing), dropped by its client after the first streamed chunk (10%), structured (10%: a chat answer to a
JSON schema), two choices (10%), or a short completion, streamed or whole. Reported: how many requests had
each outcome, and the server's resident memory each minute, with its growth from the first minute to the
last. A request that fails or hangs shows as an outcome of its own. The server is started here on 127.0.0.1,
with --idle_timeout 5 so that stalled clients are closed soon, and stopped after.

    python scripts/soak_serve.py --seconds 600 --clients 8
    python scripts/soak_serve.py --seconds 60 --slots 4 --json soak.json
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_serve import (FALLBACK_TEXT, free_port, server_flags, start_server, stop_server,  # noqa: E402
                                 wait_ready)

MALFORMED = [b"{not json", b"[1, 2]", b'{"prompt": "hi", "max_tokens": "ten"}', b'{"prompt": "hi", "n": 30}',
             b'{"prompt": "hi", "temperature": -1}', b'{"max_tokens": 4}',
             b'{"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}}']
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
IDLE_TIMEOUT = 5  # the server's --idle_timeout: a stalled client is closed this soon


def soak_request(port: int, rng: random.Random, words: list, timeout_s: float) -> str:
    """One request of the soak: malformed (10%), oversized (5%: a body past the server's cap, announced and
    never sent), stalled (5%: half a body, then nothing), dropped after its first streamed chunk (10%),
    structured (10%: a JSON schema), two choices (10%), or a short completion, streamed or whole; its outcome:
    "ok", "refused" (a 4xx with a JSON error), "closed" (a stalled client the server hung up on), "dropped",
    or what went wrong."""
    draw = rng.random()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    start = rng.randrange(len(words) - 8)
    prompt = " ".join(words[start:start + 6])
    try:
        if draw < 0.1:
            return refused(connection, rng.choice(MALFORMED), {})
        if draw < 0.15:
            return refused(connection, b"", {"Content-Length": "10000000"})
        if draw < 0.2:
            connection.connect()
            connection.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            return "closed" if connection.sock.recv(1) == b"" else "answered a stalled client"
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 6), "stream": draw < 0.6, "ignore_eos": True}
        if 0.3 <= draw < 0.4:
            body = {"messages": [{"role": "user", "content": f"A person from: {prompt}. Answer in JSON."}],
                    "max_tokens": 60, "response_format": {"type": "json_schema", "json_schema": {
                        "name": "person", "schema": PERSON}}}
        elif 0.4 <= draw < 0.5:
            body = {**body, "n": 2, "temperature": 1, "stream": False}
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return f"status {response.status}"
        if draw < 0.3:
            response.fp.readline()
            connection.sock.close()
            return "dropped"
        answer = response.read()
        if "response_format" in body:
            choice = json.loads(answer)["choices"][0]
            if choice["finish_reason"] != "stop":
                return "structured, cut by max_tokens"
            return "ok" if set(json.loads(choice["message"]["content"])) == {"name", "age"} else "broke its schema"
        if body.get("n") == 2:
            return "ok" if len(json.loads(answer)["choices"]) == 2 else "not two choices"
        return "ok"
    except (OSError, http.client.HTTPException, ValueError) as error:
        return f"error {type(error).__name__}"
    finally:
        connection.close()


def refused(connection: http.client.HTTPConnection, body: bytes, headers: dict) -> str:
    """Send a request the server must refuse: "refused" where it answers a 4xx with a JSON error."""
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    error = json.loads(response.read()).get("error", {})
    return "refused" if 400 <= response.status < 500 and error.get("message") else f"bad {response.status}"


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def soak(port: int, pid: int, seconds: float, clients: int, text: str, timeout_s: float) -> dict:
    """clients clients sending soak requests back to back for `seconds`; outcomes, and the server's resident
    memory each minute (its growth from the first minute to the last)."""
    outcomes, lock, deadline, words = {}, threading.Lock(), time.monotonic() + seconds, text.split()

    def client(seed):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            outcome = soak_request(port, rng, words, timeout_s)
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    memory = []
    while any(thread.is_alive() for thread in threads):
        memory.append(resident_mb(pid))
        time.sleep(min(60.0, max(0.0, deadline - time.monotonic())) or 1.0)
    for thread in threads:
        thread.join()
    return {"requests": sum(outcomes.values()), "outcomes": outcomes, "resident_mb": memory,
            "growth": memory[-1] / memory[1] - 1 if len(memory) > 2 else 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_flags(parser)
    parser.add_argument("--engine", default="brisk-mlfq", help="brisk-mlfq or brisk-fcfs (bench_serve.py's names)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompt_file", type=Path, help="text the prompts are cut from (default: built in)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    text = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else FALLBACK_TEXT
    port = free_port()
    server = start_server(args.engine, port, args, ("--idle_timeout", str(IDLE_TIMEOUT)))
    try:
        wait_ready(port, "/health", server, 600)
        result = {"engine": args.engine, **soak(port, server.pid, args.seconds, args.clients, text, args.timeout)}
    finally:
        stop_server(server)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
