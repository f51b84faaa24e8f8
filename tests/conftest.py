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


def assert_rollback_matches_fresh_prefill(model, prompt=(11, 42, 7, 99, 3, 150), verify=(21, 33, 8, 77, 120),
                                          follow=64):
    """After keeping m of D+1 verified tokens (every m), trunk and head caches give the next logits
    of a fresh prefill of the committed tokens (float32, atol 1e-5)."""
    import mlx.core as mx
    import numpy as np

    from mtpnb.rollback import rollback_cache

    prompt, verify = list(prompt), list(verify)  # verify: the last committed token and D drafts
    D = len(verify) - 1
    for keep in range(1, D + 2):
        cache, head_cache = model.make_cache(), model.make_head_cache()
        hidden, _ = model.forward(mx.array([prompt]), cache=cache)
        model.mtp_forward(hidden, mx.array([prompt[1:] + [verify[0]]]), cache=head_cache)
        # D - 1 speculative head steps, as drafting does, then the verify
        g = hidden[:, -1:]
        for d in verify[1:D]:
            g, _ = model.mtp_forward(g[:, -1:], mx.array([[d]]), cache=head_cache)
        hidden_v, _ = model.forward(mx.array([verify]), cache=cache)
        rollback_cache(cache, keep=keep, discard=len(verify) - keep)
        head_cache.trim(D - 1)
        _, logits = model.forward(mx.array([[follow]]), cache=cache)
        committed = prompt + verify[:keep]
        fresh_hidden, fresh_logits = model.forward(mx.array([committed + [follow]]))
        np.testing.assert_allclose(np.array(logits[0, -1]), np.array(fresh_logits[0, -1]), atol=1e-5)
        # head: the kept positions enter its cache, then one more step must match a fresh head pass
        _, head_logits = model.mtp_forward(hidden_v[:, :keep], mx.array([verify[1:keep] + [follow]]), cache=head_cache)
        full = committed + [follow]
        _, fresh_head = model.mtp_forward(fresh_hidden[:, :-1], mx.array([full[1:]]))
        np.testing.assert_allclose(np.array(head_logits[0, -1]), np.array(fresh_head[0, -1]), atol=1e-5)


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
