"""A Hugging Face hub stand-in on 127.0.0.1 serving local folders as model repos.

It answers the few calls huggingface_hub's snapshot_download makes (repo info, the file tree,
then HEAD and GET of each file under /resolve/), so the loader's real download path runs in tests
with no network: point HF_ENDPOINT at it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler, body: bool):
        path = unquote(handler.path.split("?")[0])
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree(handler, "/".join(parts[2:4]), parts[5], body)
        if parts[:2] == ["api", "models"]:
            repo_id = "/".join(parts[2:4])
            revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
            return self._repo_info(handler, repo_id, revision, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(handler, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._error(handler, 404, "EntryNotFound", "unknown endpoint", body)

    def _repo_info(self, handler, repo_id, revision, body):
        folder = self.repos.get(repo_id)
        if folder is None:
            return self._error(handler, 404, "RepoNotFound", f"Repository {repo_id} not found", body)
        if revision not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        info = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                "siblings": [{"rfilename": f} for f in files]}
        self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _tree(self, handler, repo_id, revision, body):
        folder = self.repos.get(repo_id)
        if folder is None:
            return self._error(handler, 404, "RepoNotFound", f"Repository {repo_id} not found", body)
        entries = [{"type": "file", "path": str(p.relative_to(folder)), "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                   for p in sorted(folder.rglob("*")) if p.is_file()]
        self._send(handler, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, handler, repo_id, revision, filename, body):
        folder = self.repos.get(repo_id)
        if folder is None:
            return self._error(handler, 404, "RepoNotFound", f"Repository {repo_id} not found", body)
        if revision not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        target = folder / filename
        if not target.is_file():
            return self._error(handler, 404, "EntryNotFound", f"{filename} not found", body)
        data = target.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        self._send(handler, 200, data, headers, body)

    def _error(self, handler, status, code, message, body):
        self._send(handler, status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, body)

    @staticmethod
    def _send(handler, status, data: bytes, headers: dict, body: bool):
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
