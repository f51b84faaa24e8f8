"""Fault benchmark of `mtpnb serve` over loopback (issue 15's goals), every part bounded in count and time:

    python benchmarks/server_faults.py                  # the embedded default model
    python benchmarks/server_faults.py MODEL --prefill-tokens 3000 --bursts 16,32,64

1. Bursts: N clients connect at the same moment (N = 16, 32, 64), each asks for one seeded sampled
   completion; then the same requests one at a time. Counts completions, 503s (with Retry-After) and
   resets, and whether every completion equals its sequential twin. Once with the server's default
   limits, once with tight ones (--max-connections 8 --max-queue 4) where 503s must replace resets.
2. Hang-up during a long prefill: a client sends a --prefill-tokens prompt and leaves while it is
   being prefilled; how long until the worker answers the next request (its idle latency subtracted).
3. Memory: the server's resident memory before and after a --prefill-tokens prompt.
4. Shutdown: what a streaming client, a waiting client and the process see on SIGINT and on SIGTERM.

Exits 1 if a goal is missed: a reset, a completion that differs from its sequential twin, the worker
busy more than 1 s after the hang-up, memory after the long prompt more than 10% above before, or a
shutdown that does not end the stream with finish_reason "abort" and an error event, answer the waiting
client 503, and exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

from server_load import KEY, Client, start_server

PROMPT = "def fibonacci(n):"


def request_bytes(host: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nConnection: close"
            f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def exchange(url: str, body: dict, timeout: float = 300) -> dict:
    """One request on its own connection -> {"status", "text" | "error", "retry_after"}; a reset or
    another socket error -> {"status": "reset" | "socket error", "error"}."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
            s.sendall(request_bytes(parts.hostname, body))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except ConnectionResetError as e:
        return {"status": "reset", "error": repr(e)}
    except OSError as e:
        return {"status": "socket error", "error": repr(e)}
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else "empty"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    out = {"status": status, "retry_after": headers.get("retry-after")}
    try:
        answer = json.loads(payload)
        out["text" if status == 200 else "error"] = (answer["choices"][0]["text"] if status == 200
                                                      else answer["error"]["message"])
    except (ValueError, KeyError):
        out["error"] = payload[:200].decode(errors="replace")
    return out


def burst(url: str, n: int, max_tokens: int) -> dict:
    bodies = [{"prompt": f"{PROMPT} # {i % 4}", "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
               "mtp_depth": 2} for i in range(n)]
    results, barrier = [None] * n, threading.Barrier(n)

    def client(i):
        barrier.wait()
        results[i] = exchange(url, bodies[i])

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    sequential = [exchange(url, body) for body in bodies]
    completed = [i for i, r in enumerate(results) if r and r["status"] == 200]
    busy = [r for r in results if r and r["status"] == 503]
    return {
        "clients": n, "wall_s": round(wall, 2), "completed": len(completed), "503": len(busy),
        "503_with_retry_after": sum(r["retry_after"] is not None for r in busy),
        "resets": sum(1 for r in results if r and r["status"] == "reset"),
        "other": [r for r in results if not r or r["status"] not in (200, 503, "reset")][:3],
        "identical_to_sequential": sum(results[i].get("text") == sequential[i].get("text") for i in completed),
        "sequential_ok": sum(r["status"] == 200 for r in sequential),
    }


def server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def long_prompt(n: int) -> list[int]:
    """n token ids (a prompt given as ids: exactly n tokens, whatever the tokenizer)."""
    return [(17 + 31 * i) % 200 + 10 for i in range(n)]


def hang_up_during_prefill(url: str, probe: Client, tokens: int) -> dict:
    small = {"prompt": PROMPT, "max_tokens": 1}
    idle = min(_timed(url, small) for _ in range(3))
    t_full = _timed(url, {"prompt": long_prompt(tokens), "max_tokens": 1})  # the whole prefill, for scale
    parts = urlsplit(url)
    s = socket.create_connection((parts.hostname, parts.port), timeout=60)
    s.sendall(request_bytes(parts.hostname, {"prompt": long_prompt(tokens), "max_tokens": 8, "stream": True}))
    deadline = time.monotonic() + 30
    while not probe.get("/metrics")[1]["busy"] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(min(0.5, t_full / 4))  # well inside the prefill
    s.close()
    t_hangup = time.perf_counter()
    answer = exchange(url, small)
    freed = time.perf_counter() - t_hangup - idle
    return {"prompt_tokens": tokens, "full_prefill_request_s": round(t_full, 2), "idle_small_request_s": round(idle, 3),
            "worker_free_after_hangup_s": round(max(freed, 0.0), 3), "next_request_status": answer["status"]}


def _timed(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    answer = exchange(url, body)
    if answer["status"] != 200:
        raise SystemExit(f"bench: a request failed: {answer}")
    return time.perf_counter() - t0


def memory_after_long_prompt(url: str, pid: int, tokens: int) -> dict:
    for _ in range(3):  # warm: what steady serving holds
        _timed(url, {"prompt": PROMPT, "max_tokens": 16})
    time.sleep(0.5)
    before = server_rss_mb(pid)
    _timed(url, {"prompt": long_prompt(tokens), "max_tokens": 4})
    time.sleep(1.0)
    after = server_rss_mb(pid)
    return {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "ratio": round(after / before, 3)}


def shutdown(model, sig: signal.Signals) -> dict:
    proc, url, tmp = start_server(model, [])
    parts = urlsplit(url)
    try:
        stream = socket.create_connection((parts.hostname, parts.port), timeout=60)
        stream.sendall(request_bytes(parts.hostname, {"prompt": PROMPT, "max_tokens": 2000, "stream": True}))
        received = b""
        while received.count(b"data: ") < 3:
            received += stream.recv(65536)
        waiting = socket.create_connection((parts.hostname, parts.port), timeout=60)
        waiting.sendall(request_bytes(parts.hostname, {"prompt": PROMPT, "max_tokens": 4}))
        time.sleep(0.3)
        t0 = time.perf_counter()
        proc.send_signal(sig)
        while chunk := stream.recv(65536):
            received += chunk
        waited = b""
        while chunk := waiting.recv(65536):
            waited += chunk
        rc = proc.wait(30)
        exit_s = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        tmp.cleanup()
    events = [line[6:] for line in received.decode(errors="replace").split("\n") if line.startswith("data: ")]
    parsed = [json.loads(e) for e in events if e != "[DONE]"]
    finish = [c["choices"][0]["finish_reason"] for c in parsed if c.get("choices") and c["choices"][0]["finish_reason"]]
    errors = [c["error"]["message"] for c in parsed if "error" in c]
    return {"signal": sig.name, "stream_finish_reason": finish[-1] if finish else None,
            "stream_error_event": errors[-1] if errors else None, "stream_ended_with_done": events[-1:] == ["[DONE]"],
            "waiting_client": waited.split(b"\r\n", 1)[0].decode(errors="replace"),
            "waiting_retry_after": b"Retry-After:" in waited, "exit_code": rc, "exit_s": round(exit_s, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="model to serve (default: the embedded model)")
    ap.add_argument("--bursts", default="16,32,64", help="simultaneous clients, comma-separated ('' skips them)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per burst request")
    ap.add_argument("--prefill-tokens", type=int, default=3000)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    report, problems = {}, []

    sizes = [int(n) for n in args.bursts.split(",") if n]  # --bursts "": skip this part
    for label, extra in (("default limits", []), ("tight limits", ["--max-connections", "8", "--max-queue", "4"])):
        if not sizes:
            break
        proc, url, tmp = start_server(args.model, extra)
        try:
            rows = [burst(url, n, args.max_tokens) for n in sizes]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            tmp.cleanup()
        report[f"bursts, {label}"] = rows
        for row in rows:
            print(f"burst {label:14} {row['clients']:3} clients: {row['completed']:3} completed "
                  f"({row['identical_to_sequential']} identical to the sequential run), {row['503']:3} x 503 "
                  f"({row['503_with_retry_after']} with Retry-After), {row['resets']} resets, "
                  f"{len(row['other'])} other, {row['wall_s']} s", flush=True)
            if row["resets"] or row["other"] or row["identical_to_sequential"] != row["completed"]:
                problems.append(f"burst of {row['clients']} ({label}): {row}")

    proc, url, tmp = start_server(args.model, [])
    try:
        probe = Client(url, KEY, 60)
        report["memory"] = memory_after_long_prompt(url, proc.pid, args.prefill_tokens)
        report["hang_up"] = hang_up_during_prefill(url, probe, args.prefill_tokens)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        tmp.cleanup()
    m, h = report["memory"], report["hang_up"]
    print(f"memory     server RSS {m['rss_before_mb']} MB before a {args.prefill_tokens}-token prompt, "
          f"{m['rss_after_mb']} MB after (x{m['ratio']})")
    print(f"hang-up    during a {h['prompt_tokens']}-token prefill (the whole request takes "
          f"{h['full_prefill_request_s']} s): the worker answered the next request {h['worker_free_after_hangup_s']} s "
          f"after it (idle latency {h['idle_small_request_s']} s subtracted)", flush=True)
    if m["ratio"] > 1.10:
        problems.append(f"memory after the long prompt is x{m['ratio']} of before")
    if h["worker_free_after_hangup_s"] > 1.0 or h["next_request_status"] != 200:
        problems.append(f"the worker was not free within 1 s of the hang-up: {h}")

    report["shutdown"] = [shutdown(args.model, sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    for s in report["shutdown"]:
        print(f"shutdown   {s['signal']}: the stream ended with finish_reason {s['stream_finish_reason']!r}, error "
              f"event {s['stream_error_event']!r}, [DONE] {s['stream_ended_with_done']}; the waiting client got "
              f"{s['waiting_client']!r} (Retry-After {s['waiting_retry_after']}); exit code {s['exit_code']} "
              f"after {s['exit_s']} s")
        if (s["stream_finish_reason"] != "abort" or not s["stream_error_event"] or s["exit_code"] != 0
                or " 503 " not in s["waiting_client"] + " "):
            problems.append(f"shutdown on {s['signal']}: {s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("verdict    " + ("OK: every goal met" if not problems else "FAILED: " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
