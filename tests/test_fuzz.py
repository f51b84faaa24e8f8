"""Generated hostile input for `mtpnb serve` (hypothesis): request bodies through the request parser
in-process, then raw HTTP requests (request lines, headers, lengths, bodies, parameter values) to a
live server on 127.0.0.1. None may produce a 500, a traceback, a malformed answer, or a 200 whose
empty text the model did not decide. At least MIN_INPUTS inputs a run; most are refused by parsing
or validation, so few run a generation (of at most 4 tokens on the tiny checkpoint)."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import start

from mtpnb.server.protocol import SERVER_DEFAULTS, APIError, Request, parse_body, parse_request

MIN_INPUTS = 10_000
RUNS = {"parser": 600, "http": 600, "parameters": 400}  # hypothesis examples; the parser tries MUTATIONS + 1 each
MUTATIONS = 15
TOKENS_LIMIT = 4  # the server's --max-tokens-limit
MODEL = "fuzz"  # its --model-name
counted = dict.fromkeys(RUNS, 0)


def fuzz_settings(name: str):
    return settings(max_examples=RUNS[name], deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


# -- strategies ---------------------------------------------------------------------------------------------
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=10)
EDGE_FLOATS = st.sampled_from([0, 0.0, -0.0, 1e-300, 5e-324, 1e-30, 1e300, 1.7976931348623157e308, -1, 1, 2, 0.5,
                               2**53 + 1])


def number(lo, hi):
    return st.floats(lo, hi) | EDGE_FLOATS | JSON


def integer(lo, hi):
    return st.integers(lo, hi) | st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**64 - 1]) | JSON


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | JSON,
                                 "content": st.text(max_size=20) | JSON})
PARAMETERS = {
    "model": st.sampled_from([MODEL, "gpt-4o"]) | JSON,
    "temperature": number(0, 3), "top_p": number(0, 1.5), "min_p": number(0, 1.5), "top_k": integer(-2, 300),
    "seed": integer(-1, 2**64 - 1), "max_tokens": integer(-1, TOKENS_LIMIT + 1),
    "max_completion_tokens": integer(-1, TOKENS_LIMIT + 1), "mtp_depth": integer(-1, 9),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JSON}) | JSON,
    "reasoning": st.booleans() | JSON, "chat_template_kwargs": st.fixed_dictionaries({"enable_thinking": JSON}) | JSON,
    "n": st.sampled_from([1, 2]) | JSON, "logprobs": JSON, "presence_penalty": JSON, "logit_bias": JSON,
    "response_format": JSON, "tools": JSON, "echo": JSON, "best_of": JSON, "suffix": JSON, "user": JSON,
}

def some_parameters(required: dict) -> st.SearchStrategy[dict]:
    """`required` and up to 5 of PARAMETERS (drawing only those keeps the strategy cheap)."""
    return st.lists(st.sampled_from(sorted(PARAMETERS)), max_size=5, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({**required, **{name: PARAMETERS[name] for name in names}}))


COMPLETION = some_parameters({"prompt": st.text(max_size=24) | st.lists(st.integers(-1, 300), max_size=6) | JSON})
CHAT = some_parameters({"messages": st.lists(MESSAGE, max_size=3) | JSON})
ENDPOINT_BODY = st.sampled_from(["completion", "chat"]).flatmap(
    lambda endpoint: st.tuples(st.just(endpoint), COMPLETION if endpoint == "completion" else CHAT))


def encoded(body) -> st.SearchStrategy[bytes]:
    return st.just(json.dumps(body).encode())


RAW_BODIES = (ENDPOINT_BODY.flatmap(lambda eb: encoded(eb[1]))
              | JSON.flatmap(encoded)
              | st.binary(max_size=64)
              | st.sampled_from([b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "seed": 1e999}',
                                 b"[" * 5000, b'{"a":' * 40 + b"1" + b"}" * 40, b'{"prompt": "\\ud800"}',
                                 b'{"prompt": "x"} trailing', b'{"prompt": "x", "prompt": 5}', b"\xef\xbb\xbf{}"]))


# Raw JSON text a parameter's value is replaced with, and what the byte-level mutations insert.
HOSTILE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "9" * 60, "-" + "9" * 60, "[" * 40 + "]" * 40,
           '{"a":' * 40 + "1" + "}" * 40, "true", "false", "null", '""', "{}", "[]", "-0", "0.0", '"\\ud800"',
           "18446744073709551616", "1.5", "-1", "2147483648", '"NaN"', '"1"', "[1]", '{"include_usage":NaN}']
NAMES = ["prompt", "messages", *PARAMETERS]


def mutations(body: bytes, rnd) -> list[bytes]:
    """MUTATIONS variants of `body`: bytes cut, dropped, flipped or inserted, and (for a JSON object)
    a parameter's value replaced by HOSTILE raw text."""
    out = []
    for _ in range(3):
        i = rnd.randrange(len(body) + 1)
        out += [body[:i], body[:i] + bytes([rnd.randrange(256)]) + body[i:],
                body[:i] + rnd.choice(HOSTILE).encode() + body[i + 1:]]
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    while len(out) < MUTATIONS:
        if isinstance(data, dict):
            name = rnd.choice(NAMES)
            text = json.dumps({**data, name: "\x00HOSTILE"})
            out.append(text.replace('"\\u0000HOSTILE"', rnd.choice(HOSTILE)).encode())
        else:
            i = rnd.randrange(len(body) + 1)
            out.append(body[:i] + body[i + 1:])
    return out


# -- 1. the request parser, in-process ------------------------------------------------------------------------
def parse(endpoint: str, body: bytes) -> None:
    try:
        request = parse_request(endpoint, parse_body(body), model_name=MODEL, defaults=SERVER_DEFAULTS,
                                max_tokens_limit=TOKENS_LIMIT)
    except APIError as e:
        assert e.status in (400, 404) and e.message and "\n" not in e.message, (body, e.message)
        json.dumps(e.body(), allow_nan=False)
        return
    assert isinstance(request, Request) and 1 <= request.params["max_tokens"] <= TOKENS_LIMIT


@fuzz_settings("parser")
@given(endpoint=st.sampled_from(["completion", "chat"]), body=RAW_BODIES, rnd=st.randoms(use_true_random=False))
def test_the_request_parser_answers_every_body_with_a_request_or_a_400(endpoint, body, rnd):
    for variant in [body, *mutations(body, rnd)]:
        counted["parser"] += 1
        parse(endpoint, variant)


# -- 2. raw HTTP to a live server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    live = start(checkpoints(), "--model-name", MODEL, "--max-tokens-limit", TOKENS_LIMIT, "--max-body-bytes", 4096,
                 "--quiet", log_path=tmp_path_factory.mktemp("fuzz") / "server.log")
    yield live
    assert live.stop() == 0
    log = live.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def send(server, data: bytes, *, half_close: bool = False) -> bytes:
    """One request on its own connection; the whole answer (the connection closes after it)."""
    with socket.create_connection((server.host, server.port), timeout=60) as s:
        s.sendall(data)
        if half_close:  # a body shorter than its Content-Length: say it ends here
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def check_answer(answer: bytes, *, may_be_silent: bool = False) -> tuple[int, dict, bytes]:
    """A well-formed HTTP answer that is not a server error -> (status, headers, body)."""
    if not answer and may_be_silent:  # the request never ended: the server just closed
        return 0, {}, b""
    assert b"Traceback" not in answer and b"internal server error" not in answer, answer[:2000]
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, answer[:500]
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ")
    assert version == "HTTP/1.1" and status.isdigit(), lines[0]
    status = int(status)
    assert status < 500 or status in (501, 503, 505), answer[:2000]  # unknown method, busy, HTTP/2 line
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if status != 200 and status != 204 and headers.get("content-type") == "application/json":
        error = json.loads(body)["error"]
        assert error["message"] and "\n" not in error["message"]
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out, body = out + rest[:n], rest[n + 2:]


def check_generation(request: dict, endpoint: str, headers: dict, body: bytes) -> None:
    """A 200: its text, finish_reason and token counts agree; empty text only where the model ended
    the answer itself (end of sequence, or a stop string)."""
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    if headers["content-type"].startswith("text/event-stream"):
        payloads = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert not any("error" in c for c in chunks), chunks
        part = "delta" if endpoint == "chat" else None
        text = "".join((c["choices"][0][part].get("content") or "") if part else c["choices"][0]["text"]
                       for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finish) == 1
        metrics = next(c["mtp"] for c in reversed(chunks) if "mtp" in c)
        finish = finish[0]
        with_usage = isinstance(request.get("stream_options"), dict) and request["stream_options"].get("include_usage")
        assert any("usage" in c for c in chunks) == bool(with_usage)
    else:
        answer = json.loads(body)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        finish, metrics = choice["finish_reason"], answer["mtp"]
        assert answer["usage"]["completion_tokens"] == metrics["generated_tokens"]
    assert finish in ("stop", "length") and metrics["finish_reason"] == finish
    # no token at all only when the model's first choice was its end of sequence
    assert (0 if finish == "stop" else 1) <= metrics["generated_tokens"] <= TOKENS_LIMIT
    if not text:
        assert finish == "stop", (request, text, metrics)


def http_request(method: str, path: str, version: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    head = f"{method} {path} {version}\r\n".encode()
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body


HEADER_TEXT = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
HOSTS = st.sampled_from([b"127.0.0.1", b"localhost", b"localhost:1", b"[::1]", b"evil.example", b"", b"a@127.0.0.1",
                         b"127.0.0.1:99999999"]) | HEADER_TEXT
CONTENT_TYPES = st.sampled_from([b"application/json", b"application/json; charset=utf-8", b"text/plain",
                                 b"APPLICATION/JSON", b"application/json;;;", b""]) | HEADER_TEXT
LENGTH_FORMS = st.sampled_from(["{n}", "+{n}", "{n}.0", "0{n}", " {n} ", "{n},{n}", "-{n}", "1_{n}", "{n}0", "0x{n}",
                                "{n}\x0b", "99999999999999999999", ""])


@st.composite
def raw_requests(draw):
    """-> (bytes to send, whether the body is cut short, endpoint or None)."""
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "OPTIONS", "PUT", "HEAD", "BREW", "post"]))
    endpoint = draw(st.sampled_from(["completion", "chat", None]))
    path = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}.get(endpoint) or draw(
        st.sampled_from(["/health", "/v1/models", "/metrics", "/v1/models/fuzz", "/../etc/passwd", "//", "*",
                         "/v1/completions?x=%00", "/\x1b[2J"]) | st.text(max_size=12).map(lambda t: "/" + t))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""]))
    body = draw(RAW_BODIES)
    headers = [(b"Host", draw(HOSTS))] if draw(st.integers(0, 9)) else []
    headers.append((b"Connection", b"close"))
    if draw(st.booleans()) or method == "POST":
        headers.append((b"Content-Type", draw(CONTENT_TYPES)))
    form = draw(LENGTH_FORMS)
    declared = form.format(n=len(body)).encode("latin-1")
    if draw(st.integers(0, 4)) == 0:
        declared = str(draw(st.integers(0, len(body) + 8))).encode()
    if form or method == "POST":
        headers.append((b"Content-Length", declared))
    if draw(st.integers(0, 9)) == 0:
        headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"gzip", b"identity"]))))
    extra = draw(st.lists(st.tuples(st.sampled_from([b"Origin", b"Expect", b"Authorization", b"X-Fuzz",
                                                      b"Content-Length", b"Host"]) | HEADER_TEXT, HEADER_TEXT),
                          max_size=3))
    headers += [(name, value) for name, value in extra if name and b":" not in name]
    headers = draw(st.permutations(headers))
    short = declared.isdigit() and int(declared) > len(body)
    return http_request(method, path, version, headers, body), short


@fuzz_settings("http")
@given(case=raw_requests())
def test_every_raw_request_gets_a_well_formed_answer_never_a_500(server, case):
    counted["http"] += 1
    data, short = case
    check_answer(send(server, data, half_close=short), may_be_silent=True)


@fuzz_settings("parameters")
@given(case=ENDPOINT_BODY)
def test_parameter_values_get_a_400_naming_them_or_a_real_answer(server, case):
    counted["parameters"] += 1
    endpoint, request = case
    body = json.dumps(request).encode()
    path = "/v1/completions" if endpoint == "completion" else "/v1/chat/completions"
    status, headers, answer = check_answer(send(server, http_request(
        "POST", path, "HTTP/1.1", [(b"Host", b"127.0.0.1"), (b"Content-Type", b"application/json"),
                                   (b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")], body)))
    assert status in (200, 400, 404), answer
    if status == 200:
        check_generation(request, endpoint, headers, answer)


def test_the_run_saw_enough_inputs():
    """Runs last (pytest keeps the file's order): the suite's size is part of its contract."""
    if any(n == 0 for n in counted.values()):
        pytest.skip("only part of the fuzz suite ran")
    assert sum(counted.values()) >= MIN_INPUTS, counted
