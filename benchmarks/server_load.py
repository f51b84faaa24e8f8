"""Load benchmark of `mtpnb serve` over loopback: a bounded number of concurrent clients for a bounded
time, then a check that nothing was lost or hung.

    python benchmarks/server_load.py                        # the tiny random checkpoint, 8 clients, 20 s
    python benchmarks/server_load.py MODEL --clients 16 --duration 60 --max-tokens 128
    python benchmarks/server_load.py --url http://127.0.0.1:8000 --api-key-file F   # a running server

Clients mix chat and completions, streamed and not; every --cancel-every-th request is a stream the
client abandons after two chunks (the server must cancel it and carry on). Prints requests/s,
tokens/s, latency and time-to-first-token percentiles and the server's queue waits; exits 1 if a
request failed, hung (no answer within --request-timeout) or is missing from the server's counts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

KEY = "bench-" + os.urandom(8).hex()


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Client:
    def __init__(self, url: str, key: str | None, timeout: float):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.conn = None

    def _conn(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def drop(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def get(self, path):
        conn = self._conn()
        conn.request("GET", path, headers=self.headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    def post(self, path, body, *, abandon_after: int | None = None) -> dict:
        """One request -> {"status", "tokens", "ttft", "cancelled"}."""
        t0 = time.perf_counter()
        conn = self._conn()
        conn.request("POST", path, body=json.dumps(body).encode(), headers=self.headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read()
            return {"status": resp.status, "error": text[:300].decode(errors="replace")}
        if not body.get("stream"):
            data = json.loads(resp.read())
            return {"status": 200, "tokens": data["usage"]["completion_tokens"], "latency": time.perf_counter() - t0}
        ttft, chunks, tokens = None, 0, None
        while True:
            line = resp.readline()
            if not line:
                return {"status": 0, "error": "the stream ended without [DONE]"}
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                resp.read()  # the end of the chunked body: the connection is reusable
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                return {"status": 0, "error": chunk["error"]["message"]}
            chunks += 1
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get(
                    "mtp", chunk["choices"][0].get("delta", {}).get("mtp")):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if abandon_after is not None and chunks >= abandon_after:
                self.drop()  # hang up mid-stream
                return {"status": 200, "cancelled": True}
        return {"status": 200, "tokens": tokens, "ttft": ttft, "latency": time.perf_counter() - t0}


def start_server(model: str | None, extra: list[str]):
    """`python -m mtpnb.server` on a free loopback port -> (process, url, key file dir)."""
    tmp = tempfile.TemporaryDirectory(prefix="mtpnb-bench-")
    if model is None:
        from mtpnb.fixtures import make_checkpoint

        model = str(make_checkpoint(Path(tmp.name) / "tiny"))
    key_file = Path(tmp.name) / "key"
    key_file.write_text(KEY)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # the repository: benchmarks/ is one level down
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "mtpnb.server", model, "--port", "0", "--api-key-file",
                             str(key_file), "--quiet", *extra], stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put("")], daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if not line:
            break
        print(line.rstrip(), flush=True)
        m = re.search(r"listening on (http://\S+)/v1", line)
        if m:
            return proc, m.group(1), tmp
    proc.kill()
    raise SystemExit("bench: the server did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/server_load.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model to serve (default: a tiny random checkpoint)")
    ap.add_argument("--url", help="benchmark this running server instead of starting one")
    ap.add_argument("--api-key-file", help="with --url: the server's key")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--cancel-every", type=int, default=10, help="every N-th request hangs up mid-stream (0: none)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--server-args", default="", help="extra arguments for mtpnb serve, one string")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        ap.error("--clients and --duration must be positive")

    proc = tmp = None
    key = KEY
    if args.url:
        url = args.url.rstrip("/").removesuffix("/v1")
        key = Path(args.api_key_file).read_text().strip() if args.api_key_file else os.environ.get("MTPNB_API_KEY")
    else:
        proc, url, tmp = start_server(args.model, args.server_args.split())
    probe = Client(url, key, args.request_timeout)
    model_name = probe.get("/v1/models")[1]["data"][0]["id"]
    before = probe.get("/metrics")[1]["counts"]

    records, lock = [], threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + args.duration

    def worker(c: int):
        client = Client(url, key, args.request_timeout)
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
            chat, stream = n % 2 == 0, n % 4 < 2
            abandon = args.cancel_every and n % args.cancel_every == args.cancel_every - 1
            body = {"model": model_name, "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "seed": n, "mtp_depth": args.depth, "stream": bool(stream or abandon)}
            if chat:
                body["messages"] = [{"role": "user", "content": f"Request {n}: tell me something."}]
            else:
                body["prompt"] = f"Request {n}: once upon a time"
            t0 = time.perf_counter()
            try:
                r = client.post("/v1/chat/completions" if chat else "/v1/completions", body,
                                abandon_after=2 if abandon else None)
            except TimeoutError:
                r = {"status": -1, "error": "hung: no answer within --request-timeout"}
                client.drop()
            except (OSError, http.client.HTTPException, ValueError) as e:
                r = {"status": 0, "error": repr(e)}
                client.drop()
            r.setdefault("latency", time.perf_counter() - t0)
            with lock:
                records.append(r)
        client.drop()

    print(f"bench: {args.clients} clients for {args.duration:g} s, max_tokens {args.max_tokens}, depth {args.depth}, "
          f"temperature {args.temperature}, every {args.cancel_every or 'no'}-th request abandoned mid-stream",
          flush=True)
    t0, started = time.perf_counter(), time.time()
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + args.request_timeout + 5)
    wall = time.perf_counter() - t0
    hung_threads = sum(t.is_alive() for t in threads)

    ok = [r for r in records if r["status"] == 200 and not r.get("cancelled")]
    abandoned = [r for r in records if r.get("cancelled")]
    failed = [r for r in records if r["status"] != 200]
    tokens = sum(r.get("tokens") or 0 for r in ok)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]

    # The server's view, once it has drained: every request accounted for, nothing left running.
    def server_counts():
        return probe.get("/metrics")[1]
    settle = time.monotonic() + 30
    while True:
        m = server_counts()
        delta = {k: m["counts"].get(k, 0) - before.get(k, 0) for k in ("requests", "completed", "cancelled", "error")}
        done = delta["completed"] + delta["cancelled"] + delta["error"]
        if (done >= delta["requests"] and not m["busy"] and not m["queued"]) or time.monotonic() > settle:
            break
        time.sleep(0.1)
    waits = [r["queue_wait_s"] for r in m["recent"] if r["finish_reason"] not in ("cancelled", "error")]
    ours = [r for r in m["recent"] if r.get("metrics") and r["created"] >= int(started)]
    decode = [r["metrics"]["decode_tok_s"] for r in ours]
    engine_busy = m["counts"].get("generation_s", 0.0) - before.get("generation_s", 0.0)
    health = probe.get("/health")[0] == 200

    print(f"requests   {len(records)} sent in {wall:.1f} s: {len(ok)} completed, {len(abandoned)} abandoned by "
          f"the client, {len(failed)} failed")
    print(f"throughput {len(ok) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s "
          f"({tokens} tokens; per-generation decode {percentile(decode, 50):.1f} tok/s median; engine busy "
          f"{engine_busy / wall:.0%} of the wall)")
    print(f"latency    p50 {percentile(lat, 50):.3f} s  p90 {percentile(lat, 90):.3f} s  "
          f"p99 {percentile(lat, 99):.3f} s  max {max(lat, default=float('nan')):.3f} s")
    print(f"TTFT       p50 {percentile(ttft, 50):.3f} s  p90 {percentile(ttft, 90):.3f} s (streams, queueing included)")
    print(f"queue wait p50 {percentile(waits, 50):.3f} s  p99 {percentile(waits, 99):.3f} s (server, last "
          f"{len(waits)})")
    print(f"server     requests {delta['requests']}, completed {delta['completed']}, cancelled {delta['cancelled']}, "
          f"errors {delta['error']}, busy {m['busy']}, queued {m['queued']}, health {'ok' if health else 'FAILED'}")

    problems = []
    if failed:
        problems.append(f"{len(failed)} requests failed, e.g. {failed[0].get('error')}")
    if hung_threads:
        problems.append(f"{hung_threads} clients hung")
    if delta["requests"] != len(records):
        problems.append(f"the server counted {delta['requests']} requests, the clients sent {len(records)}")
    if delta["completed"] + delta["cancelled"] != len(records) or delta["error"]:
        problems.append("the server's completed + cancelled does not match the requests (lost or failed)")
    if delta["completed"] < len(ok):
        problems.append("fewer completions on the server than answers received")
    if m["busy"] or m["queued"] or not health:
        problems.append("the server did not drain or is unhealthy")
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
        if rc != 0:
            problems.append(f"the server exited with {rc}")
        tmp.cleanup()
    print("verdict    " + ("OK: nothing lost, nothing hung" if not problems else "FAILED: " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
