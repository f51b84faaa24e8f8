"""`mtpnb serve`: a live server on 127.0.0.1 (a subprocess, `python -m mtpnb.server`, on the tiny
random checkpoint), driven by the official openai client, raw HTTP and mtpnb.connect; its outputs
are compared with the local engine's for the same parameters and seeds."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from live_server import LiveServer, env, serve_cmd, start

import mtpnb
from mtpnb import Done, MTPNBError, StepEvent, TokenEvent
from mtpnb.params import GenerationParams

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789abcdef"
LIMIT = 512  # --max-tokens-limit
BODY_LIMIT = 65536  # --max-body-bytes
STEP_TIMING = ("draft_s", "verify_s", "elapsed_s")
METRIC_COUNTS = ("depth", "prompt_tokens", "generated_tokens", "verify_calls", "drafted_tokens", "accepted_drafts",
                 "rejected_drafts", "correction_tokens", "bonus_tokens", "acceptance_rate", "acceptance_by_position",
                 "mean_tokens_per_verify", "finish_reason")


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints()


@pytest.fixture(scope="module")
def local(checkpoint):
    return mtpnb.load(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    # No prompt cache: these tests compare probabilities with a local run bit for bit, and a state
    # reused from the cache was prefilled in other chunks (same greedy tokens, other last bits; see
    # tests/test_prompt_cache.py for the server with one)
    live = start(checkpoint, "--api-key-file", key_file, "--max-tokens-limit", LIMIT, "--max-body-bytes", BODY_LIMIT,
                 "--max-queue", 32, "--prompt-cache-mb", 0, log_path=tmp / "server.log")
    yield live
    rc = live.stop(signal.SIGINT)
    assert rc == 0, f"the server exited with {rc}: {live.log()[-2000:]}"
    assert KEY not in live.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(checkpoint):
    return Path(checkpoint).name


def request(server, method, path, body=None, *, key=KEY, headers=None, raw: bytes | None = None):
    """-> (status, parsed JSON body or text)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text.decode(errors="replace")


def sse(server, path, body, *, key=KEY):
    """-> list of the stream's data payloads (parsed; '[DONE]' kept as a string)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    out = []
    for line in resp.read().decode().split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return out


def assert_error(status, body, expected_status, *, contains=None, code=None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    message = body["error"]["message"]
    assert message and "\n" not in message
    if contains:
        assert contains in message, message
    if code:
        assert body["error"]["code"] == code, body
    return message


def counts_of(events):
    return {k: getattr(events, k) for k in METRIC_COUNTS}


def steps_without_timing(steps):
    return [{k: v for k, v in s.to_dict().items() if k not in STEP_TIMING} for s in steps]


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


# -- starting ---------------------------------------------------------------------------------------------
def test_refuses_a_public_address_without_a_key(checkpoint):
    proc = subprocess.run(serve_cmd(checkpoint, "--host", "0.0.0.0", "--port", 0), capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtpnb serve: refusing to listen on 0.0.0.0"), proc.stderr
    assert "--api-key" in lines[0]


def test_in_process_refusals_and_a_keyless_loopback_server(checkpoint):
    from mtpnb.server import Server

    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(MTPNBError, match="refusing to listen"):
            Server(checkpoint, host=host, port=0)
    with pytest.raises(MTPNBError, match="empty"):
        Server(checkpoint, port=0, api_key="  ")
    with Server(checkpoint, port=0) as srv:  # loopback: no key needed
        live = LiveServer(None, srv.url, None)
        status, body = request(live, "GET", "/v1/models", key=None)
        assert status == 200 and body["data"][0]["id"] == Path(checkpoint).name
        status, body = request(live, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, key=None)
        assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_cli_parser():
    from mtpnb.server import add_serve_arguments, build_parser

    args = build_parser().parse_args(["some/model", "--port", "9000", "--depth", "2", "--reasoning", "off"])
    assert (args.model, args.port, args.depth, args.reasoning, args.host) == ("some/model", 9000, 2, "off", "127.0.0.1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--api-key", "a", "--api-key-file", "f"])
    import argparse

    sub = argparse.ArgumentParser(prog="mtpnb").add_subparsers()
    assert add_serve_arguments(sub.add_parser("serve")).parse_args([]).model is None


# -- endpoints and auth ---------------------------------------------------------------------------------------
def test_health_models_and_metrics(server, name):
    assert request(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    card = body["data"][0]
    assert card["id"] == name and card["object"] == "model"
    assert card["info"]["has_mtp"] is True and "path" not in card["info"]
    assert card["info"]["server"]["max_tokens_limit"] == LIMIT
    assert request(server, "GET", f"/v1/models/{name}")[1]["id"] == name
    status, body = request(server, "GET", "/metrics")
    assert status == 200 and body["model"] == name and isinstance(body["recent"], list)


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models", None), ("GET", "/metrics", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
])
def test_every_endpoint_but_health_needs_the_key(server, method, path, body):
    assert_error(*request(server, method, path, body, key=None), 401, code="missing_api_key")
    assert_error(*request(server, method, path, body, key="wrong-key"), 401, code="invalid_api_key")
    assert_error(*request(server, method, path, body, key=KEY[:-1]), 401, code="invalid_api_key")
    assert_error(*request(server, method, path, body, key=None, headers={"Authorization": f"Basic {KEY}"}), 401)
    assert request(server, method, path, body)[0] == 200


def test_openai_client_with_a_wrong_key(server, name):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


# -- the openai client ------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]


def test_openai_chat(client, local, name):
    ref = local.generate(MESSAGES, max_tokens=24)
    out = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.metrics.finish_reason
    assert out.usage.completion_tokens == ref.metrics.generated_tokens
    assert out.usage.prompt_tokens == ref.metrics.prompt_tokens
    assert out.model == name
    mtp = out.model_extra["mtp"]
    assert {k: mtp[k] for k in METRIC_COUNTS} == counts_of(ref.metrics)


def test_developer_messages_are_system_ones_and_function_results_tool_ones(client, local, name):
    """OpenAI's `developer` role (agents send it for reasoning models) carries what `system` does, and the
    deprecated `function` role a tool's result: the template gets the roles it knows."""
    ref = local.generate(MESSAGES + [{"role": "tool", "content": "1 2 3 4 5"}], max_tokens=8)
    developer = [{"role": "developer", "content": MESSAGES[0]["content"]}, MESSAGES[1],
                 {"role": "function", "name": "count", "content": "1 2 3 4 5"}]
    out = client.chat.completions.create(model=name, messages=developer, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == ref.text and out.usage.prompt_tokens == ref.metrics.prompt_tokens


def test_a_think_block_leaves_the_content_and_connect_keeps_the_whole_text(checkpoint, tmp_path):
    """A template that opens the think block (as Qwen3.5's does with thinking on): the output up to its end is
    `reasoning_content` / `reasoning`, not content; mtpnb.connect still gets the model's whole text."""
    import shutil

    folder = shutil.copytree(checkpoint, tmp_path / "thinker")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}",
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{% else %}<think>\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    thinker = mtpnb.load(folder)
    ref = thinker.generate(MESSAGES, reasoning=True, max_tokens=24)
    assert ref.text and "</think>" not in ref.text  # random weights: the block never closes
    live = start(folder, "--prompt-cache-mb", 0, log_path=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        m = client.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=24, temperature=0,
                                           extra_body={"reasoning": True}).choices[0].message
        assert m.model_extra["reasoning_content"] == m.model_extra["reasoning"] == ref.text.lstrip("\n")
        assert not m.content
        assert mtpnb.connect(live.url).generate(MESSAGES, reasoning=True, max_tokens=24).text == ref.text
    finally:
        assert live.stop() == 0, live.log()[-2000:]


def test_an_assistant_turns_reasoning_reaches_the_template_as_reasoning_content():
    from mtpnb.server.protocol import parse_request

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning": "greet back"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "hi", "reasoning_content": None, "reasoning": "again"},
             {"role": "user", "content": "bye"}]
    req = parse_request("chat", {"messages": turns}, model_name="m", defaults={}, max_tokens_limit=8)
    assert [m.get("reasoning_content") for m in req.prompt] == [None, "greet back", None, "again", None]


def test_openai_completions(client, local, name):
    ref = local.generate("def fibonacci(n):", max_tokens=20, temperature=0.8, seed=11, top_k=40, depth=2)
    out = client.completions.create(model=name, prompt="def fibonacci(n):", max_tokens=20, temperature=0.8, seed=11,
                                    extra_body={"top_k": 40, "mtp_depth": 2})
    assert out.choices[0].text == ref.text
    assert out.usage.completion_tokens == ref.metrics.generated_tokens
    assert out.model_extra["mtp"]["depth"] == 2


def test_openai_streaming_chat(client, local, name):
    ref = local.generate(MESSAGES, max_tokens=30, temperature=0.7, seed=3)
    chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=30, temperature=0.7,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [ref.metrics.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.metrics.generated_tokens
    kinds = [t["kind"] for c in chunks if c.choices for t in (c.choices[0].delta.model_extra or {}).get("mtp", [])]
    assert kinds == [e.kind for e in ref.events]


def test_openai_streaming_completions(client, local, name):
    ref = local.generate("Once upon a time", max_tokens=25)
    chunks = list(client.completions.create(model=name, prompt="Once upon a time", max_tokens=25, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.metrics.finish_reason
    assert all(c.usage is None for c in chunks)  # OpenAI: usage only with stream_options.include_usage
    assert chunks[-1].model_extra["mtp"]["generated_tokens"] == ref.metrics.generated_tokens


# -- the extension field over raw HTTP --------------------------------------------------------------------------
def test_raw_stream_carries_every_token_with_its_kind(server, local, name):
    params = dict(max_tokens=40, temperature=1.0, seed=3, depth=3)
    ref = list(local.stream("The quick brown fox", **params))
    result = ref[-1].result
    body = {"model": name, "prompt": "The quick brown fox", "stream": True, "max_tokens": 40, "temperature": 1.0,
            "seed": 3, "mtp_depth": 3}
    chunks = sse(server, "/v1/completions", body)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    tokens, steps = [], []
    for c in chunks:
        choice = c["choices"][0]
        for t in choice.get("mtp", []):
            assert set(t) == {"token", "text", "kind", "step", "position", "p", "q"}
            assert t["kind"] in mtpnb.TOKEN_KINDS
            tokens.append(TokenEvent.from_dict(t))
        if "mtp_step" in choice:
            steps.append(StepEvent.from_dict(choice["mtp_step"]))
    assert tokens == result.events  # p and q survive JSON exactly
    assert steps_without_timing(steps) == steps_without_timing(result.steps)
    assert {e.kind for e in tokens} >= {"rejected", "correction"}  # a random head: drafts get rejected
    assert "".join(c["choices"][0]["text"] for c in chunks) == result.text
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == result.metrics.finish_reason
    assert {k: last["mtp"][k] for k in METRIC_COUNTS} == counts_of(result.metrics)
    assert not any("usage" in c for c in chunks)  # not asked for (stream_options.include_usage)
    with_usage = sse(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})[:-1]
    assert all(c["usage"] is None for c in with_usage[:-1]) and with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"] == {"prompt_tokens": result.metrics.prompt_tokens,
                                       "completion_tokens": result.metrics.generated_tokens,
                                       "total_tokens": result.metrics.prompt_tokens + result.metrics.generated_tokens,
                                       "prompt_tokens_details": {"cached_tokens": 0}}


def test_raw_chat_stream_puts_the_extension_in_the_delta(server, local, name):
    ref = local.generate(MESSAGES, max_tokens=12, depth=1)
    chunks = sse(server, "/v1/chat/completions", {"model": name, "messages": MESSAGES, "stream": True,
                                                  "max_tokens": 12, "mtp_depth": 1})[:-1]
    events = [TokenEvent.from_dict(t) for c in chunks for t in c["choices"][0]["delta"].get("mtp", [])]
    assert events == ref.events
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_non_streamed_events_on_request(server, local, name):
    ref = local.generate("abc", max_tokens=16, temperature=0.5, seed=1)
    status, body = request(server, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 16, "temperature": 0.5,
                                                               "seed": 1, "mtp_events": True})
    assert status == 200
    assert [TokenEvent.from_dict(e) for e in body["choices"][0]["mtp"]] == ref.events
    assert len(body["choices"][0]["mtp_steps"]) == len(ref.steps)
    status, body = request(server, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 4})
    assert "mtp" not in body["choices"][0] and body["mtp"]["generated_tokens"] == 4


def test_stop_strings_are_never_streamed(server, local, name):
    full = local.generate("hello", max_tokens=40).text
    stop = full[len(full) // 3: len(full) // 3 + 3]
    ref = local.generate("hello", max_tokens=40, stop=[stop])
    assert stop not in ref.text
    chunks = sse(server, "/v1/completions", {"prompt": "hello", "max_tokens": 40, "stop": stop, "stream": True})[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- bad requests -------------------------------------------------------------------------------------------------
def engine_message(**params):
    with pytest.raises(MTPNBError) as e:
        GenerationParams(**params)
    return str(e.value)


def test_malformed_json(server):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        assert_error(*request(server, "POST", "/v1/chat/completions", raw=raw), 400, code="invalid_json")
    assert request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_unknown_model(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert_error(*request(server, "POST", "/v1/completions", {"model": "nope", "prompt": "hi"}), 404,
                 code="model_not_found", contains="'nope'")
    assert_error(*request(server, "GET", "/v1/models/nope"), 404, code="model_not_found")
    assert_error(*request(server, "GET", "/v2/nothing"), 404)


@pytest.mark.parametrize("extra,expected", [
    ({"temperature": -1}, engine_message(temperature=-1)),
    ({"top_p": 2}, engine_message(top_p=2)),
    ({"min_p": 1.5}, engine_message(min_p=1.5)),
    ({"top_k": -3}, engine_message(top_k=-3)),
    ({"mtp_depth": 99}, engine_message(depth=99)),
    ({"max_tokens": 0}, engine_message(max_tokens=0)),
    ({"seed": -1}, engine_message(seed=-1)),
    ({"stop": ["ok", ""]}, engine_message(stop=["ok", ""])),
    ({"max_tokens": LIMIT + 1}, f"above this server's limit of {LIMIT}"),
    ({"max_completion_tokens": 10**6}, "above this server's limit"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"n": 3}, "n must be 1"),
    ({"logprobs": True}, "logprobs are not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "narrator", "content": "hi"}]},
     "messages[0].role must be one of system, developer, user, assistant, tool, function, not 'narrator'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text content parts"),
])
def test_bad_parameters_get_the_one_line_message(server, client, name, extra, expected):
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    assert_error(*request(server, "POST", "/v1/chat/completions", body), 400, contains=expected)


def test_bad_prompts_are_found_by_the_engine(server, local):
    vocab = local.text_config["vocab_size"]
    with pytest.raises(MTPNBError) as e:
        local.stream([vocab + 5])
    assert_error(*request(server, "POST", "/v1/completions", {"prompt": [vocab + 5], "max_tokens": 2}), 400,
                 contains=str(e.value))
    assert_error(*request(server, "POST", "/v1/completions", {"prompt": ["a", "b"]}), 400, contains="batched")
    assert_error(*request(server, "POST", "/v1/completions", {"prompt": ""}), 400, contains="empty")
    assert_error(*request(server, "POST", "/v1/completions", {"prompt": "\ud800"}), 400, contains="Unicode")
    assert request(server, "POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})[0] == 200


def test_oversized_bodies(server):
    big = {"prompt": "x" * (BODY_LIMIT + 10), "max_tokens": 2}
    assert_error(*request(server, "POST", "/v1/completions", big), 413, code="request_too_large",
                 contains=f"limit of {BODY_LIMIT}")
    # A client that announces a huge body and waits for 100-continue is refused before sending it.
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    assert request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_garbage_on_the_socket_is_answered_and_forgotten(server):
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert request(server, "GET", "/health", key=None)[0] == 200


# -- cancellation and concurrency --------------------------------------------------------------------------------
def _metrics(server):
    return request(server, "GET", "/metrics")[1]


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server, local, name):
    before = _metrics(server)["counts"].get("cancelled", 0)
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        body = json.dumps({"model": name, "prompt": "hello", "max_tokens": LIMIT, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 3:
            received += s.recv(65536)
        request_id = re.search(rb'"id":"(cmpl-\w+)"', received).group(1).decode()
    # closed after 3 steps of 512 tokens: the server notices, closes the generator and moves on
    entry = wait_for(lambda: next((r for r in _metrics(server)["recent"] if r["id"] == request_id), None))
    assert entry is not None and entry["finish_reason"] == "cancelled"
    assert _metrics(server)["counts"]["cancelled"] == before + 1
    ref = local.generate("hello", max_tokens=8)
    status, body = request(server, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 8})
    assert status == 200 and body["choices"][0]["text"] == ref.text


def test_a_client_that_leaves_while_queued_is_skipped(server, name):
    before = _metrics(server)["counts"].get("cancelled", 0)
    first = socket.create_connection((server.host, server.port), timeout=30)
    body = json.dumps({"prompt": "hello", "max_tokens": LIMIT, "stream": True}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n")
    first.sendall(head % len(body) + body)
    received = b""
    while b"data: " not in received:  # generating
        received += first.recv(65536)
    second = socket.create_connection((server.host, server.port), timeout=30)
    body2 = json.dumps({"prompt": "queued", "max_tokens": LIMIT}).encode()
    second.sendall(head % len(body2) + body2)
    time.sleep(0.3)
    second.close()  # leaves while waiting behind the first
    first.close()
    assert wait_for(lambda: _metrics(server)["counts"].get("cancelled", 0) == before + 2)
    m = _metrics(server)
    assert not m["busy"] and m["queued"] == 0


def test_eight_concurrent_clients(server, local, name):
    jobs = []
    for i in range(8):
        params = dict(max_tokens=24 + 4 * i, depth=i % 4, seed=100 + i, temperature=0.0 if i % 3 == 0 else 0.9)
        chat = i % 2 == 0
        prompt = [{"role": "user", "content": f"Question {i}: why?"}] if chat else f"Prompt number {i}:"
        jobs.append((i, chat, prompt, params, i % 4 < 2))
    refs = {i: local.generate(prompt, **params) for i, chat, prompt, params, _ in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def run(i, chat, prompt, params, stream):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            kw = dict(model=name, max_tokens=params["max_tokens"], temperature=params["temperature"],
                      seed=params["seed"], extra_body={"mtp_depth": params["depth"]}, stream=stream)
            barrier.wait()
            if chat:
                out = c.chat.completions.create(messages=prompt, **kw)
                text = ("".join(ch.choices[0].delta.content or "" for ch in out if ch.choices) if stream
                        else out.choices[0].message.content)
            else:
                out = c.completions.create(prompt=prompt, **kw)
                text = "".join(ch.choices[0].text for ch in out) if stream else out.choices[0].text
            results[i] = text
        except Exception as e:  # noqa: BLE001
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert results == {i: refs[i].text for i in refs}
    waits = [r["queue_wait_s"] for r in _metrics(server)["recent"][-8:]]
    assert max(waits) > 0  # they queued: one generation at a time


# -- mtpnb.connect --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,params", [
    ("def fibonacci(n):", dict(max_tokens=30)),
    ("def fibonacci(n):", dict(max_tokens=30, temperature=0.9, seed=4, top_p=0.95, depth=2)),
    (MESSAGES, dict(max_tokens=20, temperature=0.6, seed=9, min_p=0.05)),
    ("hi there", dict(max_tokens=16, chat=True, depth=0)),
    ([5, 6, 7, 8], dict(max_tokens=12, depth=4, stop=["zz"])),
])
def test_connect_round_trip(server, local, name, prompt, params):
    remote = mtpnb.connect(server.url, api_key=KEY)
    assert remote.name == name and remote.has_mtp and remote.info()["layers"] == local.info()["layers"]
    got = list(remote.stream(prompt, **params))
    ref = list(local.stream(prompt, **params))
    assert [type(e) for e in got] == [type(e) for e in ref]
    assert [e for e in got if isinstance(e, TokenEvent)] == [e for e in ref if isinstance(e, TokenEvent)]
    assert steps_without_timing([e for e in got if isinstance(e, StepEvent)]) == \
        steps_without_timing([e for e in ref if isinstance(e, StepEvent)])
    a, b = got[-1].result, ref[-1].result
    assert isinstance(got[-1], Done)
    assert (a.tokens, a.text, a.events) == (b.tokens, b.text, b.events)
    assert counts_of(a.metrics) == counts_of(b.metrics)
    assert remote.generate(prompt, **params).text == b.text


def test_connect_errors_and_cancel(server, local):
    with pytest.raises(MTPNBError, match="API key"):
        mtpnb.connect(server.url, api_key="wrong")
    with pytest.raises(MTPNBError, match="API key"):
        mtpnb.connect(server.url + "/v1/", api_key="")
    with pytest.raises(MTPNBError, match="cannot reach"):
        mtpnb.connect("http://127.0.0.1:9", api_key=KEY)
    remote = mtpnb.connect(server.url + "/v1/", api_key=KEY)
    for bad in (dict(depth=99), dict(temperature=-2), dict(nonsense=1)):
        with pytest.raises(MTPNBError) as e:
            remote.stream("hi", **bad)
        with pytest.raises(MTPNBError) as f:
            local.stream("hi", **bad)
        assert str(e.value) == str(f.value)
    with pytest.raises(MTPNBError, match="vocabulary"):
        remote.stream([10**6])  # found by the server's engine, raised before the first event
    before = remote.metrics()["counts"].get("cancelled", 0)
    stream = remote.stream("hello", max_tokens=LIMIT)
    for _, _ in zip(range(6), stream):
        pass
    stream.close()
    assert wait_for(lambda: remote.metrics()["counts"].get("cancelled", 0) == before + 1)
    assert remote.generate("hello", max_tokens=5).text == local.generate("hello", max_tokens=5).text


def test_the_server_logs_requests_but_never_the_key(server):
    log = server.log()
    assert "POST /v1/completions" in log and KEY not in log


# -- Prometheus ---------------------------------------------------------------------------------------------------
def scrape(server, query="?format=prometheus", accept=None) -> dict:
    """{(sample name, labels minus model_name): value}, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/metrics" + query, headers={"Authorization": f"Bearer {KEY}", **({"Accept": accept} if accept else {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200, text
    assert resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            assert s.labels.get("model_name", MODEL_NAME) == MODEL_NAME or family.name == "mtpnb:http_errors"
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return samples


def test_prometheus_metrics_count_what_the_engine_did(server, local, name, monkeypatch):
    pytest.importorskip("prometheus_client")
    monkeypatch.setitem(globals(), "MODEL_NAME", name)
    before = scrape(server)
    runs = [("The quick brown fox", dict(max_tokens=40, temperature=1.0, seed=3, depth=3)),
            ("hello", dict(max_tokens=12, depth=0)), ("abc", dict(max_tokens=20, depth=2))]
    refs = [local.generate(prompt, **params) for prompt, params in runs]
    for prompt, params in runs:
        body = {"prompt": prompt, "max_tokens": params["max_tokens"], "mtp_depth": params["depth"],
                "temperature": params.get("temperature", 0), "seed": params.get("seed")}
        assert request(server, "POST", "/v1/completions", body)[0] == 200
    assert_error(*request(server, "POST", "/v1/completions", {"prompt": "x", "mtp_depth": 99}), 400)
    after = scrape(server, "", accept="text/plain;version=0.0.4;q=0.9,*/*;q=0.1")  # as a scraper asks

    def delta(sample, **labels):
        key = (sample, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps = [s for r in refs for s in r.steps if s.drafted]
    assert delta("mtpnb:spec_decode_num_drafts_total") == len(steps) > 0
    assert delta("mtpnb:spec_decode_num_draft_tokens_total") == sum(r.metrics.drafted_tokens for r in refs)
    accepted = sum(r.metrics.accepted_drafts for r in refs)
    assert delta("mtpnb:spec_decode_num_accepted_tokens_total") == accepted
    per_pos = [delta("mtpnb:spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) for p in range(3)]
    assert per_pos == [sum(s.accepted > p for s in steps) for p in range(3)] and sum(per_pos) == accepted
    assert ("mtpnb:spec_decode_num_accepted_tokens_per_pos_total", (("position", "2"),)) in after  # zeros show
    assert delta("mtpnb:generation_tokens_total") == sum(r.metrics.generated_tokens for r in refs)
    assert delta("mtpnb:prompt_tokens_total") == sum(r.metrics.prompt_tokens for r in refs)
    assert delta("mtpnb:time_to_first_token_seconds_count") == 3
    assert delta("mtpnb:e2e_request_latency_seconds_count") == 3
    assert delta("mtpnb:request_time_per_output_token_seconds_count") == 3
    assert delta("mtpnb:request_success_total", finished_reason="length") == 3
    assert delta("mtpnb:http_errors_total", status="400") == 1
    assert after[("mtpnb:num_requests_waiting", ())] == 0 and after[("mtpnb:num_requests_running", ())] == 0
    # the JSON view stays the default (mtpnb.connect reads it); OpenMetrics on request; bad formats refused
    assert request(server, "GET", "/metrics")[1]["model"] == name
    assert request(server, "GET", "/metrics", headers={"Accept": "application/json, text/plain"})[1]["model"] == name
    for how in ({"headers": {"Accept": "application/openmetrics-text; version=1.0.0"}}, {}):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        path = "/metrics" if how else "/metrics?format=openmetrics"
        conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}", **how.get("headers", {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.getheader("Content-Type").startswith("application/openmetrics-text") and text.endswith("# EOF\n")
    assert_error(*request(server, "GET", "/metrics?format=xml"), 400, contains="unknown metrics format")
