import warnings

import pytest

import mtpnb
from mtpnb.fixtures import make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Folder factory: one random checkpoint per set of options, written once per session."""
    made = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **options)
        return made[key]

    return get


@pytest.fixture(scope="session")
def hybrid_model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3_5"))


@pytest.fixture(scope="session")
def attention_model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3"))


def load_quietly(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtpnb.load(path, **kw)


class ServerProcess:
    """`python -m mtpnb.server ARGS` in a subprocess, on 127.0.0.1 and a free port: .url, .host, .port."""

    def __init__(self, args, log_path):
        import os
        import queue
        import re
        import subprocess
        import sys
        import threading
        import time
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(mtpnb.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONWARNINGS"] = "ignore"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mtpnb.server", *map(str, args), "--port", "0"],
                                         stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout] + [lines.put("")], daemon=True).start()
        self.url, seen, deadline = None, [], time.monotonic() + 120
        while self.url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if not line:
                break
            seen.append(line)
            m = re.search(r"listening on (http://\S+)/v1", line)
            self.url = m and m.group(1)
        if self.url is None:
            self.proc.kill()
            pytest.fail(f"the server did not start: {''.join(seen)} {self.log()}")
        self.host, port = self.url.split("//")[1].split(":")
        self.port = int(port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT, as a terminal's Ctrl-C; the exit code."""
        import signal
        import subprocess

        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
