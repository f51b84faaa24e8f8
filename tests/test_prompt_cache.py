"""Multi-turn prefix reuse (mtpnb.prompt_cache) on the default model: a hybrid trunk (Gated DeltaNet
layers, whose state cannot be trimmed, and full attention), an MTP head with its own cache, and a chat
template (Qwen3.5's, which renders an earlier answer otherwise than it was generated). Greedy output
must be identical with and without reuse, at depth 0 and 3; a failed or cancelled generation must
leave no state behind; the server shares one cache and reports it."""

from __future__ import annotations

import http.client
import json

import pytest

import mtpnb
from mtpnb import MTPNBError, PromptCache, TokenEvent
from mtpnb.engine import PREFILL_CHUNK_CPU, PREFILL_CHUNK_GPU
from mtpnb.loading import DEFAULT_MODEL_DIR

from live_server import start

PREFILL_CHUNK = max(PREFILL_CHUNK_CPU, PREFILL_CHUNK_GPU)  # a prompt longer than this needs several chunks anywhere

SYSTEM = "You are a careful Python programmer. Answer with short, correct code. " * 6
QUESTIONS = ["Write a function that reverses a list.", "Now make it work for strings too.", "Add a docstring."]
KEY = "prefix-key-0123456789"


@pytest.fixture(scope="module")
def model():
    return mtpnb.load()


def conversation(model, depth, cache, max_tokens=20):
    messages, results = [{"role": "system", "content": SYSTEM}], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        results.append((list(messages), model.generate(messages, depth=depth, max_tokens=max_tokens, cache=cache)))
        messages.append({"role": "assistant", "content": results[-1][1].text})
    return results


@pytest.mark.parametrize("depth", [0, 3])
def test_greedy_output_is_the_same_with_and_without_reuse(model, depth):
    cache = PromptCache()
    without = conversation(model, depth, None)
    for run in range(2):  # the second run goes through states the first one left, used once already
        reused = conversation(model, depth, cache)
        assert [r.tokens for _, r in reused] == [r.tokens for _, r in without]
        assert [r.metrics.prompt_tokens for _, r in reused] == [r.metrics.prompt_tokens for _, r in without]
        assert (reused[0][1].metrics.cached_prompt_tokens > 0) == (run == 1)
        for (previous, _), (messages, r) in zip(reused, reused[1:]):
            # at least the conversation up to the previous question came from the cache
            ids = model.engine.encode(previous, chat=True)
            assert r.metrics.cached_prompt_tokens >= model.engine.history_length(previous, ids, chat=True) > 0
            assert r.metrics.cached_prompt_tokens < r.metrics.prompt_tokens
    assert cache.stats["hits"] == 5 and cache.nbytes <= cache.max_bytes


@pytest.mark.parametrize("depth", [0, 3])
def test_a_prompt_that_extends_an_answer_starts_at_the_answer(model, depth):
    cache = PromptCache()
    prompt = model.tokenizer.encode("def add(a, b):")
    first = model.generate(prompt, depth=depth, max_tokens=12, cache=cache)
    follow = prompt + first.tokens + model.tokenizer.encode("\n\ndef sub(a, b):")
    reused = model.generate(follow, depth=depth, max_tokens=12, cache=cache)
    assert reused.tokens == model.generate(follow, depth=depth, max_tokens=12).tokens
    cached = reused.metrics.cached_prompt_tokens
    if depth == 0 and first.metrics.finish_reason == "length":  # plain decoding fed every output token
        assert cached == len(prompt) + len(first.tokens)
    assert cached >= len(prompt)


@pytest.mark.parametrize("family", ["qwen3_5_moe", "deepseek_v3"])
def test_two_mtp_layers_keep_their_caches(tmp_path, family):
    """A head of two MTP layers (each its own KV cache; DeepSeek's latent attention cache too)."""
    pytest.importorskip("transformers")
    from mtpnb.fixtures import make_hf_checkpoint

    model = mtpnb.load(make_hf_checkpoint(tmp_path, family=family, experts="per_expert", mtp_layers=2))
    cache, prompt = PromptCache(), [5, 17, 99, 3, 42, 250, 7]
    for turn in range(3):
        reused = model.generate(prompt, depth=3, max_tokens=10, cache=cache)
        assert reused.tokens == model.generate(prompt, depth=3, max_tokens=10).tokens
        assert (reused.metrics.cached_prompt_tokens > 0) == (turn > 0)
        prompt = prompt + reused.tokens + [100 + turn, 3]


def test_a_failed_or_cancelled_generation_leaves_no_state(model, monkeypatch):
    cache = PromptCache()
    long_prompt = model.tokenizer.encode("x = 1\n" * PREFILL_CHUNK)[: PREFILL_CHUNK + 100]
    forward, calls = model.forward, []

    def failing(ids, cache=None, **kw):  # the prefill's second chunk fails
        calls.append(ids.shape)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return forward(ids, cache=cache, **kw)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        model.generate(long_prompt, depth=3, max_tokens=4, cache=cache)
    monkeypatch.undo()
    assert len(cache) == 0

    cancelled = model.stream(long_prompt, depth=3, max_tokens=4, cache=cache)
    cancelled.cancel()  # before the prefill
    assert list(cancelled)[-1].result.metrics.finish_reason == "cancelled"
    assert len(cache) == 0

    stopped = model.stream(long_prompt, depth=3, max_tokens=60, cache=cache)
    for event in stopped:
        if isinstance(event, TokenEvent):
            break
    stopped.close()  # cut while decoding: the prompt's state (complete) stays, no answer's
    assert len(cache) == 1 and cache.stats["stored"] == 1
    reused = model.generate(long_prompt + [11], depth=3, max_tokens=8, cache=cache)
    assert reused.metrics.cached_prompt_tokens == len(long_prompt)
    assert reused.tokens == model.generate(long_prompt + [11], depth=3, max_tokens=8).tokens


def test_the_cache_is_bounded_and_checks_its_input(model):
    cache = PromptCache(max_bytes=3 << 20, max_entries=3)
    for n in range(5):
        model.generate(model.tokenizer.encode(f"# file {n}\nimport os\n"), depth=3, max_tokens=6, cache=cache)
        assert cache.nbytes <= 3 << 20 and len(cache) <= 3
    assert len(cache) >= 1
    with pytest.raises(MTPNBError, match="max_bytes"):
        PromptCache(max_bytes=0)
    with pytest.raises(MTPNBError, match="cache must be an mtpnb.PromptCache"):
        model.generate("x", cache={})


def test_the_widgets_runner_takes_the_cache_to_the_mlx_thread(model):
    from mtpnb.widgets.runner import Generation

    cache, messages = PromptCache(), [{"role": "user", "content": QUESTIONS[0]}]
    first = Generation(model, messages, {"cache": cache, "max_tokens": 6}, []).start().wait()
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": QUESTIONS[1]}]
    second = Generation(model, messages, {"cache": cache, "max_tokens": 6}, []).start().wait()
    assert second.metrics.cached_prompt_tokens > 0
    assert second.tokens == model.generate(messages, max_tokens=6).tokens


# -- the server: one cache for all requests ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix-serve")
    (tmp / "key").write_text(KEY)
    live = start(DEFAULT_MODEL_DIR, "--api-key-file", tmp / "key", "--model-name", "default", "--depth", 3,
                 "--prompt-cache-mb", 64, log_path=tmp / "server.log")
    yield live
    assert live.stop() == 0, live.log()[-2000:]


def test_the_server_reuses_turns_across_requests_and_reports_it(server, model):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    from prometheus_client.parser import text_string_to_metric_families

    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(QUESTIONS[:2]):
        messages.append({"role": "user", "content": question})
        out = oai.chat.completions.create(model="default", messages=messages, max_tokens=16)
        ref = model.generate(messages, depth=3, max_tokens=16)
        assert out.choices[0].message.content == ref.text
        assert (out.usage.prompt_tokens_details.cached_tokens > 0) == (i == 1)
        messages.append({"role": "assistant", "content": out.choices[0].message.content})
    # the same conversation through the Anthropic API: the system prompt and the turns are cached now
    msg = claude.messages.create(model="default", system=SYSTEM, messages=messages[1:] + [
        {"role": "user", "content": QUESTIONS[2]}], max_tokens=16)
    ref = model.generate(messages + [{"role": "user", "content": QUESTIONS[2]}], depth=3, max_tokens=16)
    assert msg.content[0].text == ref.text
    assert msg.usage.cache_read_input_tokens > 0
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == ref.metrics.prompt_tokens

    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/metrics?format=prometheus", headers={"Authorization": f"Bearer {KEY}"})
    samples = {s.name: s.value for f in text_string_to_metric_families(conn.getresponse().read().decode())
               for s in f.samples}
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    stats = json.loads(conn.getresponse().read())["prefix_cache"]
    conn.close()
    reused = out.usage.prompt_tokens_details.cached_tokens + msg.usage.cache_read_input_tokens
    assert samples["mtpnb:prefix_cache_hits_total"] == reused == stats["tokens_reused"]
    assert samples["mtpnb:prefix_cache_queries_total"] == stats["tokens_queried"]
    assert samples["mtpnb:prefix_cache_bytes"] == stats["bytes"] > 0 and stats["entries"] > 0
