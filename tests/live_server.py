"""`python -m mtpnb.server` as a subprocess on 127.0.0.1, for the server's tests."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mtpnb

ROOT = Path(mtpnb.__file__).resolve().parent.parent


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["PYTHONWARNINGS"] = "ignore"
    return e


def serve_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "mtpnb.server", *map(str, args)]


class LiveServer:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path
        host, port = url.split("//")[1].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGINT, timeout: float = 20.0) -> int:
        """Send `sig`, wait for the exit; the exit code (killed and -9 past `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def start(checkpoint, *args, log_path: Path, timeout: float = 120.0) -> LiveServer:
    """Serve `checkpoint` on a free port with `args`; returns once it listens (fails the test otherwise)."""
    import pytest

    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve_cmd(checkpoint, "--port", 0, *args), stdout=subprocess.PIPE, stderr=log,
                                env=env(), text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put("")], daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + timeout
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if not line:
            break
        seen.append(line)
        m = re.search(r"listening on (http://\S+)/v1", line)
        url = m and m.group(1)
    if url is None:
        proc.kill()
        pytest.fail(f"the server did not start: {''.join(seen)} {log_path.read_text()}")
    return LiveServer(proc, url, log_path)
