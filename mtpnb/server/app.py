"""The HTTP side of `mtpnb serve`: the standard library's ThreadingHTTPServer (one thread per
connection, HTTP/1.1 keep-alive, SSE over chunked transfer encoding; HTTP/1.0 clients get the stream
delimited by the connection's close) in front of the single engine worker. Handler threads parse,
check and answer; only the worker touches MLX.

A client that goes away is noticed while its request waits (the socket polled for EOF) and while it
streams (the poll, or a failed write); its job is then cancelled: skipped if still queued, its
generator closed if running.

What a shared endpoint must hold to:
- Bursts: the listen backlog is the kernel's largest, and a connection past --max-connections (or a
  request past --max-queue) gets a 503 with Retry-After, never a reset.
- Browsers: POSTs must be application/json (a page's form or text/plain POST is refused, CSRF); the
  Host header must be a loopback name or one given with --allowed-host (DNS rebinding); a request with
  an Origin header is refused unless --cors-origin allows that origin, and only then are CORS headers
  sent and preflights answered.
- HTTP: one plain-digits Content-Length, no Transfer-Encoding on requests; logged request lines have
  their control characters escaped.
- Shutdown (close(), SIGINT/SIGTERM under `mtpnb serve`): streams in flight end with a chunk whose
  finish_reason is "abort" and an error event, requests in flight or queued get 503, idle connections
  are closed; bounded by SHUTDOWN_S.
"""

from __future__ import annotations

import atexit
import email.errors
import hmac
import ipaddress
import logging
import queue
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..errors import MTPNBError
from ..events import Done, StepEvent, TokenEvent
from . import anthropic, prometheus
from .protocol import SERVER_DEFAULTS, APIError, Encoder, dumps, parse_body, parse_request
from .worker import Job, Stats, Worker, prompt_ids

log = logging.getLogger("mtpnb.server")

POLL_S = 0.1  # how often a waiting handler checks that its client is still there
RETRY_AFTER_S = 1  # the Retry-After of a 503: the worker frees up within a generation
LINGER_S = 2.0  # how long a refused connection is read from before it is closed (closing unread data resets it)
SHUTDOWN_S = 5.0  # how long close() waits for the streams it cut to say so
# http.server's own escaping of control characters in logged request lines (CPython gh-100001)
_ESCAPE = BaseHTTPRequestHandler._control_char_table
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address ("" and 0.0.0.0 are not)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def is_loopback_name(name: str) -> bool:
    """`localhost`, a `.localhost` name (RFC 6761: always loopback, browsers included) or a loopback IP
    literal. No DNS lookup: the answer must not depend on what a resolver says (DNS rebinding)."""
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header ("[::1]:8000" -> "::1"), lower case; None if it is not a host[:port]."""
    m = _HOST.fullmatch(header.strip())
    if m is None:
        return None
    return (m.group("ip6") or m.group("name")).lower().rstrip(".")


def escape(text: str) -> str:
    """Control characters shown as \\xNN, as http.server logs request lines."""
    return text.translate(_ESCAPE)


def refusal(host: str) -> str:
    return (f"refusing to listen on {host or 'all interfaces'} (not a loopback address) without an API key: "
            "pass --api-key-file FILE (or --api-key KEY, or set MTPNB_API_KEY), or listen on 127.0.0.1")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, handler, app, max_connections: int):
        self.app = app
        self._slots = threading.BoundedSemaphore(max_connections)
        self._interrupted = False  # a KeyboardInterrupt caught while handing a connection over
        # Refused connections are answered on threads of their own, as many as the connection limit;
        # past that, accepting waits for one of them (the rest of the burst waits in the backlog).
        self._refusals = threading.BoundedSemaphore(max_connections)
        # The listen backlog, where a burst waits to be accepted (then served or refused with a 503): the
        # most the kernel allows (net.core.somaxconn caps it), whatever --max-connections is. A small
        # one (socketserver's 5, or a --max-connections of 6) overflows into SYN cookies, and a cookie
        # that comes back while the queue is full is answered with a reset.
        self.request_queue_size = socket.SOMAXCONN
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refuse(request, APIError(503, "too many connections: retry later (mtpnb serve --max-connections)",
                                          code="server_busy"))
            return
        # The connection's thread owns the slot and the socket from the moment it exists. A stop signal
        # raises KeyboardInterrupt in this thread, possibly while Thread.start waits for a thread that
        # already runs: the interrupt is then passed on from service_actions, after this returns, so that
        # neither the slot is released twice (the ValueError that followed was swallowed with the
        # interrupt, and the server ignored its stop signal) nor the socket closed under its thread.
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="mtpnb-serve-connection", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread could be started: the slot was never handed over
            self._slots.release()
            raise
        except KeyboardInterrupt:
            self._interrupted = True

    def service_actions(self):
        super().service_actions()
        if self._interrupted:
            raise KeyboardInterrupt

    def refuse(self, request, error: APIError) -> None:
        """Answer a connection that will not be served with `error` and close it, without a reset.
        With every refusal thread busy, accepting waits for one (each ends within 2 * LINGER_S) and the
        rest of the burst waits in the backlog: closing the connection unanswered instead (a reset when
        its request is unread) left clients of a burst of 3 x --max-connections without an answer."""
        while not self._refusals.acquire(timeout=POLL_S):
            if self.app.closing:
                self.shutdown_request(request)
                return
        threading.Thread(target=self._refuse, args=(request, error), name="mtpnb-serve-refuse", daemon=True).start()

    def _refuse(self, request, error: APIError) -> None:
        try:
            data = dumps(error.body())
            request.settimeout(LINGER_S)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (RETRY_AFTER_S, len(data), data))
            # Closing a socket with unread data sends a reset, which can reach the client before
            # the answer: read the request (bounded) until the client closes its side.
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and request.recv(65536):
                pass
        except OSError:
            pass
        finally:
            request.close()
            self._refusals.release()

    def refuse_waiting(self) -> None:
        """At shutdown: answer the connections still in the listen backlog with 503."""
        self.socket.setblocking(False)
        while True:
            try:
                request, _ = self.socket.accept()
            except OSError:
                return
            request.setblocking(True)
            self.refuse(request, APIError(503, "the server is shutting down", code="shutting_down"))

    def handle_error(self, request, client_address):
        """A client that resets or times out is routine; anything else is logged, not printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        log.error("error on a connection from %s", client_address[0], exc_info=True)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Counter:
    """How many requests are being answered; wait_idle() waits for none."""

    def __init__(self):
        self._n = 0
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            self._n += 1

    def leave(self) -> None:
        with self._idle:
            self._n -= 1
            if self._n == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._n == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "mtpnb-serve"

    def setup(self):
        self.timeout = self.server.app.socket_timeout
        super().setup()
        self.server.app.connections.add(self.connection)

    def finish(self):
        self.server.app.connections.discard(self.connection)
        super().finish()

    # -- routing --------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        self._body_read = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path.startswith("/v1/"):
            path = path[3:]
        app.requests.enter()
        try:
            if app.closing:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            self._check_origin()
            if method == "OPTIONS" and app.cors_origins and self.headers.get("Access-Control-Request-Method"):
                return self._preflight()
            if path == "/health":
                return self._only(method, "GET") or self._json(200, {"status": "ok"})
            routes = {"/models": "GET", "/metrics": "GET", "/chat/completions": "POST", "/completions": "POST",
                      "/messages": "POST", "/messages/count_tokens": "POST"}
            name = path.startswith("/models/") and path[len("/models/"):]
            if path not in routes and not name:
                raise APIError(404, f"no such endpoint: {method} {urlsplit(self.path).path}", code="not_found")
            self._only(method, routes.get(path, "GET"))
            app.check_auth(self.headers.get("Authorization"), self.headers.get("x-api-key"))
            if name:
                if name != app.model_name:
                    raise APIError(404, f"model {name!r} not found; this server serves {app.model_name!r}",
                                   code="model_not_found")
                return self._json(200, app.model_card())
            if path == "/models":
                return self._json(200, {"object": "list", "data": [app.model_card()]})
            if path == "/metrics":
                return self._metrics()
            if path == "/messages/count_tokens":
                return self._count_tokens()
            endpoints = {"/chat/completions": "chat", "/completions": "completion", "/messages": "messages"}
            return self._generate(endpoints[path])
        except APIError as e:
            app.stats.count(f"http_{e.status}")
            self._json(e.status, self._error_body(path, e),
                       close=(not self._body_read and self.command == "POST") or app.closing)
        except (BrokenPipeError, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug: answer 500, keep serving
            log.exception("internal error on %s %s", method, escape(path))
            app.stats.count("http_500")
            try:
                error = APIError(500, f"internal server error: {type(e).__name__}")
                self._json(500, self._error_body(path, error), close=True)
            except OSError:
                self.close_connection = True
        finally:
            app.requests.leave()

    @staticmethod
    def _error_body(path: str, error: APIError) -> dict:
        """Each API's error shape: Anthropic's on /v1/messages, OpenAI's elsewhere."""
        return anthropic.error_body(error) if path.startswith("/messages") else error.body()

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise APIError(405, f"{self.path} accepts {allowed}, not {method}", code="method_not_allowed")

    # -- who may ask ----------------------------------------------------------------------------------
    def _check_host(self) -> None:
        """A Host this server answers for (DNS rebinding: a page on evil.example whose name now
        resolves to 127.0.0.1 sends Host: evil.example)."""
        app = self.server.app
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise APIError(400, "the request has more than one Host header", code="bad_request")
        if not hosts:
            if self.request_version == "HTTP/1.0":  # HTTP/1.0 has no Host; no browser sends it
                return
            raise APIError(400, "the request has no Host header", code="bad_request")
        name = host_name(hosts[0])
        if name is None or not app.host_allowed(name):
            raise APIError(421, f"this server does not answer for the host {escape(hosts[0])!r}: use a loopback "
                                "name (localhost, 127.0.0.1), or start it with --allowed-host NAME",
                           code="host_not_allowed")

    def _check_origin(self) -> None:
        """Requests from web pages (they carry an Origin) only from the origins --cors-origin names."""
        origin = self.headers.get("Origin")
        if origin is not None and not self.server.app.origin_allowed(origin):
            raise APIError(403, f"requests from web pages at {escape(origin)!r} are refused "
                                "(mtpnb serve --cors-origin ORIGIN allows one)", code="origin_not_allowed")

    def _preflight(self) -> None:
        """A CORS preflight from an allowed origin (checked already): what it may send."""
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def end_headers(self):
        origin = self.headers.get("Origin") if getattr(self, "headers", None) is not None else None
        if origin is not None and self.server.app.cors_origins and self.server.app.origin_allowed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    # -- requests with a body -------------------------------------------------------------------------
    def _content_length(self) -> int:
        """The one Content-Length, plain ASCII digits ("+5", "1_0", "5, 5", two headers: refused, as a
        proxy in front may read them otherwise: request smuggling)."""
        if self.headers.get_all("Transfer-Encoding"):
            raise APIError(411, "send the request body with a Content-Length (Transfer-Encoding is not accepted)",
                           code="length_required")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise APIError(411, "the request needs a Content-Length header", code="length_required")
        if len(lengths) > 1:
            raise APIError(400, "the request has more than one Content-Length header", code="invalid_request")
        digits = lengths[0].strip(" \t")
        if not re.fullmatch(r"[0-9]+", digits):
            raise APIError(400, "the Content-Length header is not a length in plain digits", code="invalid_request")
        limit = self.server.app.max_body_bytes
        if len(digits.lstrip("0")) > len(str(limit)) or int(digits) > limit:
            raise APIError(413, f"the request body is {digits.lstrip('0')[:30]} bytes, above this server's limit of "
                                f"{limit} (mtpnb serve --max-body-bytes)", code="request_too_large")
        return int(digits)

    def _read_body(self) -> bytes:
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, "the request body must be JSON sent as Content-Type: application/json",
                           code="unsupported_media_type")
        n = self._content_length()
        body = self.rfile.read(n)
        if len(body) < n:
            raise ConnectionError("client closed while sending the body")
        self._body_read = True
        return body

    def handle_expect_100(self):
        """Refuse a body with a bad or oversized length before the client sends it."""
        try:
            self._check_host()
            self._content_length()
        except APIError as e:
            self._body_read = False
            self._json(e.status, e.body(), close=True)
            return False
        return super().handle_expect_100()

    def parse_request(self):
        """The request line and headers (http.server), then the Host check for every request."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # its answers have no status line: refuse with one
            self.request_version = "HTTP/1.1"
            self._json(400, APIError(400, "HTTP/0.9 is not supported: send an HTTP/1.1 request",
                                     code="bad_request").body(), close=True)
            return False
        try:
            if self.headers.get_payload() or any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect)
                                                 for d in self.headers.defects):
                # a line that is no header ("a b: c") ends the standard library's header parsing: what
                # follows (a Connection: close, a Content-Length) would be ignored
                raise APIError(400, "a header line is malformed (no 'name: value', or a name with spaces)",
                               code="bad_request")
            self._check_host()
        except APIError as e:
            self.server.app.stats.count(f"http_{e.status}")
            self._json(e.status, e.body(), close=True)
            return False
        return True

    def _generate(self, endpoint: str) -> None:
        app = self.server.app
        data = parse_body(self._read_body())
        limits = dict(model_name=app.model_name, defaults=app.defaults, max_tokens_limit=app.max_tokens_limit)
        if endpoint == "messages":
            req = anthropic.parse_request(data, **limits)
            encoder = anthropic.Encoder(req, app.model.tokenizer)
        else:
            req = parse_request(endpoint, data, **limits)
            encoder = Encoder(req, app.fingerprint, app.model.tokenizer)
        job = Job(req)
        app.worker.submit(job)
        app.stats.count("requests")
        try:
            kind, value = self._next(job)
            if kind == "error":
                raise value
            if kind != "start":  # "end": cancelled before it started
                return
            opening = encoder.begin(value)  # value: the prompt's token ids
            if req.stream:
                self._stream(job, encoder, opening)
            else:
                result = self._collect(job)
                if result is not None:
                    self._json(200, encoder.response(result))
        except (BrokenPipeError, ConnectionError, TimeoutError, OSError):
            job.cancel()
            self.close_connection = True

    def _count_tokens(self) -> None:
        """Anthropic's count_tokens: the prompt a Messages request would prefill, rendered the same way."""
        app = self.server.app
        data = parse_body(self._read_body())
        req = anthropic.parse_request({**data, "stream": False}, model_name=app.model_name, defaults=app.defaults,
                                      max_tokens_limit=app.max_tokens_limit)
        try:
            ids = prompt_ids(app.model, req)
        except MTPNBError as e:
            raise APIError(400, str(e), code="invalid_parameter") from None
        self._json(200, {"input_tokens": len(ids)})

    def _next(self, job: Job):
        """The worker's next message for this job; cancel the job if the client hangs up meanwhile."""
        while True:
            try:
                return job.out.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    job.cancel()
                    raise ConnectionError("client gone")

    def _collect(self, job: Job):
        while True:
            kind, value = self._next(job)
            if kind == "error":
                raise value
            if kind == "end":
                return None
            if isinstance(value, Done):
                return value.result

    def _stream(self, job: Job, encoder, opening: list) -> None:
        """Server-sent events: the encoder (protocol.Encoder or anthropic.Encoder) makes them."""
        # HTTP/1.1: chunked; HTTP/1.0 knows no chunks: the body ends when the connection closes.
        self._chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._sse(opening)
        tokens: list[TokenEvent] = []
        while True:
            kind, value = self._next(job)
            if kind == "error":  # after the headers: the text so far, cut ("abort"), the error event in the API's shape
                self._sse(encoder.cut(tokens))
                self._sse(encoder.error(value))
                break
            if kind == "end":
                if tokens:
                    self._sse(encoder.step(tokens, None))
                break
            if isinstance(value, TokenEvent):
                tokens.append(value)
            elif isinstance(value, StepEvent):
                if self._client_gone():
                    raise ConnectionError("client gone")
                self._sse(encoder.step(tokens, value))
                tokens = []
            elif isinstance(value, Done):
                if tokens:
                    self._sse(encoder.step(tokens, None))
                    tokens = []
                self._sse(encoder.last(value.result))
        self._sse(encoder.end())
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _sse(self, events: list) -> None:
        """Write (event name or None, payload) pairs as server-sent events, one chunk each (HTTP/1.0:
        unchunked)."""
        for name, payload in events:
            data = b"data: " + (payload.encode() if isinstance(payload, str) else dumps(payload)) + b"\n\n"
            if name:
                data = b"event: " + name.encode() + b"\n" + data
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _client_gone(self) -> bool:
        """The peer closed its side (EOF pending) or the socket failed."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _metrics(self) -> None:
        """JSON (mtpnb.connect's view) or Prometheus' exposition, by content negotiation."""
        app = self.server.app
        try:
            accept = prometheus.negotiate(urlsplit(self.path).query, self.headers.get("Accept"))
        except ValueError as e:
            raise APIError(400, str(e), param="format") from None
        if accept is None:
            return self._json(200, app.metrics())
        if app.prometheus is None:
            raise APIError(501, prometheus.INSTALL, code="not_installed")
        cache = app.worker.prompt_cache
        data, content_type = app.prometheus.render(accept, model_name=app.model_name, waiting=app.worker.queued,
                                                   running=int(app.worker.current is not None),
                                                   prefix_cache=None if cache is None else cache.stats)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- responses ------------------------------------------------------------------------------------
    def _json(self, status: int, body: dict, close: bool = False) -> None:
        data = dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="mtpnb"')
        if status == 503:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (bad request line, oversized headers...) in the JSON error format."""
        if getattr(self, "request_version", "HTTP/0.9") not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.1"  # answer garbage with a status line too
        try:
            self._json(code, APIError(code, message or self.responses.get(code, ("error",))[0],
                                      code="bad_request").body(), close=True)
        except OSError:
            self.close_connection = True

    def log_message(self, format, *args):  # the request line and status only: never a header
        log.info("%s %s", self.address_string(), escape(format % args))


class Server:
    """An OpenAI-compatible server for one model.

        server = Server(model_or_path, port=0).start()   # serves on a thread; server.url
        ...
        server.close()

    `model` is a loaded mtpnb.Model (then nothing else should generate with it while it serves), or
    what mtpnb.load takes (a folder, a hub id, None for the default model), loaded on the MLX runtime's thread.
    """

    def __init__(self, model=None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 model_name: str | None = None, depth: int | None = None, reasoning: bool | None = None,
                 temperature: float | None = None, max_tokens_limit: int = 4096,
                 max_prompt_tokens: int | None = None, max_body_bytes: int = 1 << 20, max_queue: int = 64,
                 max_connections: int = 128, socket_timeout: float = 60.0, load_options: dict | None = None,
                 allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (),
                 prompt_cache_mb: int = 1024):
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise MTPNBError("the API key is empty")
        if api_key is not None and not api_key.strip().isascii():
            raise MTPNBError("the API key has non-ASCII characters, which an HTTP header cannot carry: "
                             "use ASCII letters, digits and punctuation")
        if not api_key and not is_loopback(host):
            raise MTPNBError(refusal(host))
        for name, value in (("max_tokens_limit", max_tokens_limit), ("max_body_bytes", max_body_bytes),
                            ("max_queue", max_queue), ("max_connections", max_connections)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MTPNBError(f"{name} must be an integer >= 1, not {value!r}")
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or not isinstance(
                max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise MTPNBError(f"max_prompt_tokens must be an integer >= 1 or None (the model's context), not "
                             f"{max_prompt_tokens!r}")
        self.host, self.port = host, port
        for name in allowed_hosts:
            if host_name(name) != name.lower().rstrip("."):
                raise MTPNBError(f"--allowed-host takes a host name or address without a port, not {name!r}")
        for origin in cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise MTPNBError(f"--cors-origin takes an origin like https://app.example.com (scheme and host, "
                                 f"no path) or *, not {origin!r}")
        # The Host check holds when listening on loopback (the keyless default, what DNS rebinding
        # reaches) or when names are given; a keyed public server answers to any name otherwise.
        self.allowed_hosts = {h.lower().rstrip(".") for h in allowed_hosts}
        self._check_hosts = is_loopback(host) or bool(self.allowed_hosts)
        self.cors_origins = tuple(cors_origins)
        self.closing = False
        self.connections: set[socket.socket] = set()  # open client connections, closed at shutdown
        self.requests = _Counter()  # requests being answered
        self._key = api_key.strip().encode() if api_key else None
        self._model_name = model_name
        self.defaults = dict(SERVER_DEFAULTS)
        self.defaults.update({k: v for k, v in (("depth", depth), ("reasoning", reasoning),
                                                ("temperature", temperature)) if v is not None})
        from ..params import GenerationParams

        GenerationParams(**{k: v for k, v in self.defaults.items() if v is not None})  # bad defaults: fail now
        self.max_tokens_limit = max_tokens_limit
        self.max_body_bytes = max_body_bytes
        self.socket_timeout = socket_timeout
        self.prometheus = prometheus.PrometheusMetrics.create()
        self.stats = Stats(prometheus=self.prometheus)
        if isinstance(prompt_cache_mb, bool) or not isinstance(prompt_cache_mb, int) or prompt_cache_mb < 0:
            raise MTPNBError(f"prompt_cache_mb must be an integer >= 0 (0: no prompt cache), not {prompt_cache_mb!r}")
        self.worker = Worker(model, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                             load_options=load_options, stats=self.stats, prompt_cache_bytes=prompt_cache_mb << 20)
        self._max_prompt_tokens = max_prompt_tokens
        self._max_connections = max_connections
        self._httpd: _HTTPServer | None = None
        self._info: dict | None = None
        self._thread: threading.Thread | None = None
        from .. import __version__

        self.fingerprint = f"mtpnb-{__version__}"

    # -- lifecycle ------------------------------------------------------------------------------------
    def bind(self) -> "Server":
        """Listen (fails fast if the port is taken), then load the model; does not serve yet."""
        if self._httpd is None:
            try:
                self._httpd = _HTTPServer((self.host, self.port), Handler, self, self._max_connections)
            except OSError as e:
                raise MTPNBError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
            self.port = self._httpd.server_address[1]
            atexit.register(self.close)  # the worker must end before the interpreter does
            try:
                self.worker.start()
            except BaseException:
                self._httpd.server_close()
                raise
            if self._max_prompt_tokens is None:
                config = getattr(self.model, "text_config", None) or {}
                limit = config.get("max_position_embeddings")
                self.worker.max_prompt_tokens = limit
        return self

    def start(self) -> "Server":
        """Bind and serve on a background thread."""
        self.bind()
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="mtpnb-serve-http", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and serve on this thread until close() (from another thread) or KeyboardInterrupt."""
        self.bind()
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def close(self) -> None:
        """Stop serving, within about SHUTDOWN_S: stop accepting (connections still in the backlog get
        503), cut the generation in flight (its stream ends with finish_reason "abort" and an error
        event; a non-streamed request gets 503), refuse what is queued (503), let the handlers write
        that, close idle connections, end the worker. Idempotent."""
        atexit.unregister(self.close)
        self.closing = True
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(5)
                self._thread = None
            if self._httpd.socket.fileno() >= 0:
                self._httpd.refuse_waiting()
            self._httpd.server_close()
        deadline = time.monotonic() + SHUTDOWN_S
        self.worker.close(timeout=SHUTDOWN_S)
        self.requests.wait_idle(max(0.0, deadline - time.monotonic()))
        for connection in list(self.connections):  # idle keep-alive connections: their threads end
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- state ----------------------------------------------------------------------------------------
    @property
    def model(self):
        return self.worker.model

    @property
    def model_name(self) -> str:
        return self._model_name or self.model.name

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def host_allowed(self, name: str) -> bool:
        return not self._check_hosts or is_loopback_name(name) or name in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins

    def check_auth(self, header: str | None, api_key: str | None = None) -> None:
        """`Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's)."""
        if self._key is None:
            return
        if api_key is not None:
            if not hmac.compare_digest(api_key.strip().encode(), self._key):  # constant time
                raise APIError(401, "invalid API key", code="invalid_api_key")
            return
        if not header:
            raise APIError(401, "this server needs an API key: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
                           code="missing_api_key")
        scheme, _, token = header.strip().partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), self._key)  # constant time
        if scheme.lower() != "bearer" or not ok:
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def model_card(self) -> dict:
        if self._info is None:
            info = self.model.info()
            info.pop("path", None)  # the server's file system is none of the client's business
            self._info = info
        info = dict(self._info)
        info["name"] = self.model_name
        info["server"] = {"depth": self.defaults["depth"], "reasoning": self.defaults["reasoning"],
                          "temperature": self.defaults["temperature"], "max_tokens_limit": self.max_tokens_limit,
                          "max_prompt_tokens": self.worker.max_prompt_tokens, "version": self.fingerprint}
        return {"id": self.model_name, "object": "model", "created": int(self.stats.started), "owned_by": "mtpnb",
                "info": info}

    def metrics(self) -> dict:
        snap = self.stats.snapshot()
        cache = self.worker.prompt_cache
        snap.update(model=self.model_name, queued=self.worker.queued,
                    busy=self.worker.current is not None, prefix_cache=None if cache is None else cache.stats)
        return snap
