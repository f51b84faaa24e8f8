"""A model served by `mtpnb serve`, used from here as if it were loaded locally.

    model = mtpnb.connect("http://mac.local:8000", api_key=...)   # or $MTPNB_API_KEY
    for event in model.stream("def fibonacci(n):", depth=3, max_tokens=64):
        ...                                                       # TokenEvent / StepEvent / Done

`stream` yields the same TokenEvent / StepEvent objects the local engine yields, rebuilt from the
stream's `mtp` extension fields, then Done(result); closing it hangs up, which cancels the
generation on the server. Bad input raises MTPNBError (the server's one-line message) before the
first event. Standard library HTTP only (http.client).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from .errors import MTPNBError
from .events import Done, Metrics, Result, StepEvent, TokenEvent, final_result
from .params import GenerationParams

KEY_ENV = "MTPNB_API_KEY"
# GenerationParams name -> request field
FIELDS = {"depth": "mtp_depth", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
          "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop", "reasoning": "reasoning"}


def connect(url: str, api_key: str | None = None, *, timeout: float = 300.0) -> "RemoteModel":
    """Attach to an `mtpnb serve` server (checks that it answers, and the key)."""
    return RemoteModel(url, api_key, timeout=timeout)


class RemoteModel:
    """The engine-like surface of a served model: name, has_mtp, info(), stream(), generate()."""

    remote = True
    tokenizer = None  # the tokenizer lives on the server

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 300.0):
        if not isinstance(url, str) or "://" not in url:
            raise MTPNBError(f"url must look like http://host:port, not {url!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MTPNBError(f"url must look like http://host:port, not {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        base = parts.path.rstrip("/")
        self._base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.url = f"{parts.scheme}://{parts.netloc}{self._base}"
        key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        self._key = key.strip() if key else None
        self.timeout = timeout
        card = self._get("/v1/models")["data"][0]
        self.name: str = card["id"]
        self._info: dict = dict(card.get("info") or {}, name=self.name, url=self.url)
        self._info["device"] = f"{self._info.get('device', '?')} on {self.url}"  # where it runs, for displays

    # -- the engine-like surface ----------------------------------------------------------------------
    @property
    def has_mtp(self) -> bool:
        return bool(self._info.get("has_mtp"))

    def info(self) -> dict:
        return dict(self._info)

    def generate(self, prompt, **params) -> Result:
        return final_result(self.stream(prompt, **params))

    def stream(self, prompt, **params) -> Iterator[TokenEvent | StepEvent | Done]:
        """Like Model.stream: validates and sends before the first event; yields the events."""
        path, body = self._request(prompt, params)
        conn, response = self._open("POST", path, body)
        return self._events(conn, response)

    # -- server views ---------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """The server's /metrics: counters and recent generations' metrics."""
        return self._get("/metrics")

    def health(self) -> bool:
        try:
            return self._get("/health").get("status") == "ok"
        except MTPNBError:
            return False

    def __repr__(self) -> str:
        mtp = "MTP head" if self.has_mtp else "no MTP head"
        return f"<mtpnb.RemoteModel {self.name} at {self.url}: {self._info.get('family')}, {mtp}>"

    # -- requests -------------------------------------------------------------------------------------
    def _request(self, prompt, params: dict) -> tuple[str, dict]:
        GenerationParams.of(**params)  # the same checks and messages as a local model
        chat = bool(params.get("chat"))
        body: dict[str, Any] = {"model": self.name, "stream": True}
        for name, field in FIELDS.items():
            value = params.get(name)
            if value is not None:
                body[field] = list(value) if name == "stop" and not isinstance(value, str) else value
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return "/v1/chat/completions", {**body, "messages": list(prompt)}
        if isinstance(prompt, str) and chat:
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
        if isinstance(prompt, (list, tuple)):
            prompt = list(prompt)
        return "/v1/completions", {**body, "prompt": prompt}

    def _connection(self):
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _open(self, method: str, path: str, body: dict | None = None):
        conn = self._connection()
        headers = {"Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._base + path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise MTPNBError(f"cannot reach the mtpnb server at {self.url}: {_one_line(e)}") from None
        if response.status != 200:
            text = response.read()
            conn.close()
            raise MTPNBError(self._error_message(response.status, text))
        return conn, response

    def _error_message(self, status: int, text: bytes) -> str:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {status}"
        if status == 401:
            hint = "pass api_key= to mtpnb.connect" if not self._key else "check the API key"
            return f"the server at {self.url} refused the request: {message} ({hint})"
        return message

    def _get(self, path: str) -> dict:
        conn, response = self._open("GET", path)
        try:
            return json.loads(response.read())
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise MTPNBError(f"bad answer from the mtpnb server at {self.url}: {_one_line(e)}") from None
        finally:
            conn.close()

    def _events(self, conn, response) -> Iterator[TokenEvent | StepEvent | Done]:
        events: list[TokenEvent] = []
        steps: list[StepEvent] = []
        metrics = None
        try:
            for chunk in _sse(response):
                if chunk is None:  # [DONE]
                    break
                if "error" in chunk:
                    raise MTPNBError(f"the server failed: {chunk['error'].get('message')}")
                if "mtp" in chunk and isinstance(chunk["mtp"], dict):
                    metrics = Metrics.from_dict(chunk["mtp"])
                for choice in chunk.get("choices") or ():
                    part = choice.get("delta", choice)
                    for d in part.get("mtp") or ():
                        event = TokenEvent.from_dict(d)
                        events.append(event)
                        yield event
                    if part.get("mtp_step"):
                        step = StepEvent.from_dict(part["mtp_step"])
                        steps.append(step)
                        yield step
        except (OSError, http.client.HTTPException) as e:
            raise MTPNBError(f"the connection to {self.url} broke: {_one_line(e)}") from None
        finally:
            conn.close()  # early close of this generator: the server cancels the generation
        if metrics is None:
            raise MTPNBError(f"the stream from {self.url} ended without its metrics")
        output = [e for e in events if e.kind != "rejected"]  # their pieces add up to the text, thinking included
        yield Done(Result([e.token for e in output], "".join(e.text for e in output), events, steps, metrics))


def _sse(response) -> Iterator[dict | None]:
    """Server-sent events' data payloads, parsed; None for [DONE]."""
    data: list[bytes] = []
    while True:
        line = response.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif not line and data:
            payload = b"\n".join(data)
            data = []
            if payload == b"[DONE]":
                yield None
                return
            yield json.loads(payload)


def _one_line(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
