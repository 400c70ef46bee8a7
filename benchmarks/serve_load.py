"""Requests per second and latency of a ``glmport serve`` endpoint at several concurrency levels.

::

    python benchmarks/serve_load.py --serve output/quickstart/final            # starts a server on a free port
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME --key KEY

At each level, N clients (threads, the standard library's http.client) send chat completions back to back
until ``--requests`` have been answered; each asks for the same greedy reply of at most ``--max-tokens``
tokens. The table gives requests/s, the median and 95th-percentile latency (request sent to last byte
received), generated tokens/s, and the statuses seen (anything but 200 is a failure of the setup: the
server started here gets a queue deep enough for the largest level). A figure for a note, not a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse


def start_server(model: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "glmport", "serve", model, "--port", "0", "--max-queue", "64",
               "--no-access-log", *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"glmport serve: (http://\S+) \(models: ([^,)]+)", log.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            sys.exit(f"glmport serve exited {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    process.kill()
    sys.exit("glmport serve did not start within 300 s")


def first_model(url: str, key: str | None) -> str:
    status, body = call(url, "GET", "/v1/models", None, key)
    if status != 200:
        sys.exit(f"GET /v1/models: {status} {body[:200]!r}")
    return json.loads(body)["data"][-1]["id"]  # the last one: the result (or adapter) rather than the base


def call(url: str, method: str, path: str, payload: dict | None, key: str | None) -> tuple[int, bytes]:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        connection.request(method, path, json.dumps(payload) if payload is not None else None, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def level(url: str, payload: dict, key: str | None, clients: int, total: int) -> dict:
    latencies, tokens, statuses = [], [], Counter()
    lock = threading.Lock()
    remaining = [total]

    def client() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            started = time.perf_counter()
            status, body = call(url, "POST", "/v1/chat/completions", payload, key)
            took = time.perf_counter() - started
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(took)
                    tokens.append(json.loads(body)["usage"]["completion_tokens"])

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"concurrency": clients, "requests": total, "seconds": round(wall, 2),
            "requests_per_s": round(len(ordered) / wall, 2),
            "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
            "p95_ms": round(1000 * ordered[math.ceil(0.95 * len(ordered)) - 1], 1) if ordered else None,  # nearest rank
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "tokens_per_reply": round(sum(tokens) / len(tokens), 1) if tokens else None,
            "statuses": dict(statuses)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--serve", metavar="MODEL", help="start `glmport serve MODEL` on a free port for the run")
    parser.add_argument("--serve-arg", action="append", default=[], help="one more argument for glmport serve")
    parser.add_argument("--model", help="the model name to ask (default: the last of GET /v1/models)")
    parser.add_argument("--key", default=os.environ.get("GLMPORT_API_KEY") or None)
    parser.add_argument("--prompt", default="Say hello")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=48, help="requests per level (default 48)")
    parser.add_argument("--concurrency", default="1,4,16", help="levels, comma-separated (default 1,4,16)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    process = None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            if args.serve:
                process, url = start_server(args.serve, args.serve_arg, Path(scratch) / "server.log")
            else:
                url = args.url.rstrip("/")
            model = args.model or first_model(url, args.key)
            payload = {"model": model, "messages": [{"role": "user", "content": args.prompt}],
                       "max_tokens": args.max_tokens, "temperature": 0}
            call(url, "POST", "/v1/chat/completions", payload, args.key)  # warm up
            results = [level(url, payload, args.key, int(n), args.requests) for n in args.concurrency.split(",")]
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    if args.json:
        print(json.dumps({"url": url, "model": model, "results": results}, indent=2))
        return 0
    print(f"{url}, model {model}, prompt {args.prompt!r}, max_tokens {args.max_tokens}, {args.requests} requests per level")
    print(f"{'concurrency':>11} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'tok/s':>7} {'tok/reply':>9}  statuses")
    for row in results:
        print(f"{row['concurrency']:>11} {row['requests_per_s']:>7} {row['p50_ms']:>8} {row['p95_ms']:>8} "
              f"{row['tokens_per_s']:>7} {row['tokens_per_reply']:>9}  {row['statuses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
