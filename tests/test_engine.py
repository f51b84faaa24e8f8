"""The decode loop: greedy equality with plain decoding, exact rollback, events, stopping, errors."""

import collections

import mlx.core as mx
import numpy as np
import pytest

import mtpnb
from conftest import ROLLBACK_DESIGNS, assert_rollback_matches_fresh_prefill, use_rollback_design
from mtpnb import MTPNBError
from mtpnb.sampling import Sampling

PROMPTS = ([5, 7, 9], [100, 3, 44, 3], [250, 251], [17])


@pytest.fixture(scope="module")
def echo_models(checkpoints):
    """Hybrid and all-attention trunks with an echo head: every acceptance count 0..D occurs."""
    models = {}
    for family in ("qwen3_5", "qwen3", "llama"):
        m = mtpnb.load(checkpoints(family=family, head="echo", logit_scale=0.5))
        m.tokenizer.eos_token_ids = set()
        models[family] = m
    return models


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3", "llama"])
def test_greedy_mtp_equals_plain_greedy(echo_models, family):
    model = echo_models[family]
    seen = collections.Counter()
    for prompt in PROMPTS:
        plain = model.generate(prompt, depth=0, max_tokens=120)
        assert len(plain.tokens) == 120
        for depth in (1, 2, 3, 4):
            spec = model.generate(prompt, depth=depth, max_tokens=120)
            assert spec.tokens == plain.tokens, (prompt, depth)
            if depth == 3:
                seen.update(s.accepted for s in spec.steps[1:])
    if family == "qwen3_5":  # the test must have run every rollback case on the hybrid trunk
        assert set(seen) == {0, 1, 2, 3}, seen


def test_greedy_with_a_random_head(hybrid_model):
    model = hybrid_model
    plain = model.generate("def f(x):", depth=0, max_tokens=100)
    for depth in (1, 5, 8):
        assert model.generate("def f(x):", depth=depth, max_tokens=100).tokens == plain.tokens


def test_greedy_with_a_draft_vocabulary(echo_models):
    """Drafts restricted to a shortlist: still the plain greedy output, and drafts only from the list."""
    model = echo_models["qwen3_5"]
    plain = model.generate([5, 7, 9], depth=0, max_tokens=120)
    shortlist = sorted(set(plain.tokens[::2]))  # half of what the trunk says: some drafts must fail
    model.set_draft_vocab(shortlist, context=0)
    try:
        spec = model.generate([5, 7, 9], depth=3, max_tokens=120)
    finally:
        model.set_draft_vocab(None)
    assert spec.tokens == plain.tokens
    drafted = [e.token for e in spec.events if e.kind in ("accepted", "rejected")]
    assert drafted and set(drafted) <= set(shortlist) and spec.metrics.accepted_drafts > 0


@pytest.mark.parametrize("room", [1, 1024])
def test_drafts_also_come_from_the_generations_own_context(echo_models, room):
    """With room for context tokens, a token outside the shortlist may be drafted once the prompt or the
    output before its round holds it (up to `room` such tokens), and the output is still the plain greedy
    one; with room for them all, more drafts are accepted than from the shortlist alone."""
    model = echo_models["qwen3_5"]
    prompt = [5, 7, 9]
    plain = model.generate(prompt, depth=0, max_tokens=120)
    most_said = max(set(plain.tokens), key=plain.tokens.count)
    shortlist = sorted(set(plain.tokens[::2]) - {most_said})  # what the context has and the list lacks
    runs = {}
    for context in (0, room):
        model.set_draft_vocab(shortlist, context=context)
        try:
            runs[context] = model.generate(prompt, depth=3, max_tokens=120)
        finally:
            model.set_draft_vocab(None)
    spec = runs[room]
    assert spec.tokens == plain.tokens
    seen, added = set(prompt), []  # the context before each round: the prompt, the output so far
    for step in sorted({e.step for e in spec.events}):
        events = [e for e in spec.events if e.step == step]
        for e in events:
            if e.kind in ("accepted", "rejected") and e.token not in shortlist:
                assert e.token in seen, f"step {step} drafted {e.token}, in neither the shortlist nor the context"
                if e.token not in added:
                    added.append(e.token)
        seen |= {e.token for e in events if e.kind != "rejected"}
    assert 0 < len(added) <= room
    if room > 1:
        assert spec.metrics.accepted_drafts > runs[0].metrics.accepted_drafts


def test_a_generations_draft_vocabulary_keeps_one_width_of_distinct_tokens(echo_models):
    """The prompt's tokens join the shortlist most recent first while there is room; the columns keep
    one width (the compiled acceptance keeps its shapes), padded with tokens outside the vocabulary,
    and no token has two columns (the residual writes q back to the whole vocabulary by token id)."""
    model = echo_models["qwen3_5"]
    V = model.text_config["vocab_size"]
    try:
        model.set_draft_vocab([1, 2, 3], context=4)
        vocabulary = model.draft_vocabulary([9, 8, 2, 9, 7, 6, 5])
        assert vocabulary.added == [5, 6, 7, 9] and vocabulary.width == 7
        assert vocabulary.ids.tolist() == [1, 2, 3, 5, 6, 7, 9]
        vocabulary.add([10])  # no room left
        assert vocabulary.ids.tolist() == [1, 2, 3, 5, 6, 7, 9]

        model.set_draft_vocab([1, 2, 3], context=2 * V)  # room for every other token, no more
        vocabulary = model.draft_vocabulary([4])
        assert vocabulary.width == V and sorted(vocabulary.ids.tolist()) == list(range(V))
        assert vocabulary.ids.tolist()[:4] == [1, 2, 3, 4]
        vocabulary.add([V - 1, 0])
        assert vocabulary.ids.tolist()[:6] == [1, 2, 3, 4, V - 1, 0]
        assert sorted(vocabulary.ids.tolist()) == list(range(V))
        logits = model.draft_logits(mx.ones((1, 1, model.text_config["hidden_size"])), 0, vocabulary)
        assert logits.shape[-1] == V and np.isneginf(np.asarray(logits[..., 6:])).all()
    finally:
        model.set_draft_vocab(None)


@pytest.mark.parametrize("family, design", [("qwen3_5", d) for d in ROLLBACK_DESIGNS] + [("qwen3", "kernel")])
def test_rollback_gives_the_logits_of_a_fresh_prefill(checkpoints, monkeypatch, family, design):
    """After keeping m of D+1 verified tokens (every m), trunk and head caches give the next logits
    of a fresh prefill of the committed tokens (float32, atol 1e-5). Every Gated DeltaNet design
    (conftest.use_rollback_design): the CPU kernel's replay, per-step states kept during the verify
    (CUDA's path), and mlx-lm's replay (Metal's path)."""
    use_rollback_design(monkeypatch, design)
    assert_rollback_matches_fresh_prefill(mtpnb.load(checkpoints(family=family)))  # random head: its cache rolls back too


def test_events_add_up_to_the_result(hybrid_model):
    res = hybrid_model.generate("import os\n", depth=3, max_tokens=60, temperature=0.9, seed=7)
    out = [e for e in res.events if e.kind != "rejected"]
    assert [e.token for e in out] == res.tokens
    assert "".join(e.text for e in out) == res.text
    assert res.text == hybrid_model.tokenizer.decode(res.tokens)
    m = res.metrics
    assert m.generated_tokens == len(res.tokens)
    assert m.accepted_drafts == sum(e.kind == "accepted" for e in res.events)
    # one correction or bonus per verify, except when the output ended inside the last step's accepted drafts:
    # then the drafts after the end are shown as nothing and counted as not accepted
    last = res.steps[-1]
    cut = last.drafted - last.accepted if last.emitted == last.accepted else 0
    assert m.correction_tokens + m.bonus_tokens == m.verify_calls - (last.emitted == last.accepted)
    assert m.rejected_drafts == sum(e.kind == "rejected" for e in res.events) + cut
    assert m.drafted_tokens == m.accepted_drafts + m.rejected_drafts == 3 * m.verify_calls
    assert len(m.acceptance_by_position) == 3
    for e in res.events:
        if e.kind in ("accepted", "rejected"):
            assert 0 < e.q <= 1 and 0 <= e.p <= 1 and 1 <= e.position <= 3
    assert set(mtpnb.Metrics().to_dict()) == set(m.to_dict())
    assert mtpnb.Result.from_dict(res.to_dict()).to_dict() == res.to_dict()


@pytest.mark.parametrize("depth", [0, 3])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}], ids=["greedy", "sampled"])
def test_event_probabilities_are_the_targets(echo_models, depth, sampling):
    """Each output token's p, and each step's first tested draft's, is the target's probability at its
    position: the softmax at greedy, the processed distribution when sampling (one fresh forward)."""
    model = echo_models["qwen3_5"]  # drafts accepted and rejected: every row of a verify is read
    prompt = [5, 7, 9]
    res = model.generate(prompt, depth=depth, max_tokens=40, **sampling)
    _, logits = model.forward(mx.array(prompt + res.tokens)[None])
    logits = logits[0, len(prompt) - 1:].astype(mx.float32)
    target = Sampling(**{k: v for k, v in sampling.items() if k != "seed"})
    probs = np.array(mx.softmax(logits, axis=-1) if target.greedy else mx.exp(target.logprobs(logits)))
    position, checked = 0, 0
    for e in res.events:
        if e.kind == "rejected" and e.position != res.steps[e.step].accepted + 1:
            continue  # a draft after the first rejected one: its target is conditioned on that draft
        assert e.p == pytest.approx(probs[position, e.token], abs=1e-4), (e, position)
        checked += 1
        position += e.kind != "rejected"
    assert position == len(res.tokens) and checked >= len(res.tokens)
    if depth:
        assert {"accepted", "rejected"} <= {e.kind for e in res.events}


def test_no_acceptance_without_drafts(hybrid_model, monkeypatch):
    """The first token after a prefill is plain decoding's choice, never an acceptance of zero drafts:
    MLX's CUDA backend faults on the zero-size arrays that would take (seen on an H200)."""
    from mtpnb import engine

    for name in ("accept_greedy", "accept_sampled"):
        original = getattr(engine, name)

        def checked(p, q, drafts, *key, original=original):
            assert drafts.shape[-1] > 0 and q.shape[-2] > 0
            return original(p, q, drafts, *key)

        monkeypatch.setattr(engine, name, checked)
    for sampling in ({}, {"temperature": 0.8, "seed": 1}):
        for depth in (0, 1, 3):
            assert len(hybrid_model.generate("x = ", depth=depth, max_tokens=12, **sampling).tokens) > 0


def test_metrics_names_are_the_documented_ones(hybrid_model):
    names = set(hybrid_model.generate("x", depth=2, max_tokens=5).metrics.to_dict())
    for required in ("ttft_s", "prefill_tok_s", "decode_tok_s", "end_to_end_tok_s", "decode_tok_s_first32",
                     "verify_calls", "drafted_tokens", "accepted_drafts", "rejected_drafts", "correction_tokens",
                     "bonus_tokens", "acceptance_by_position", "mean_tokens_per_verify", "active_memory_mb",
                     "peak_memory_mb"):
        assert required in names


def test_sampling_is_reproducible_with_a_seed(hybrid_model):
    a = hybrid_model.generate("abc", depth=3, max_tokens=30, temperature=1.0, top_k=20, seed=3)
    b = hybrid_model.generate("abc", depth=3, max_tokens=30, temperature=1.0, top_k=20, seed=3)
    assert a.tokens == b.tokens and [e.kind for e in a.events] == [e.kind for e in b.events]


def test_cancel_then_reuse(hybrid_model):
    full = hybrid_model.generate("hello", depth=2, max_tokens=40)
    stream = hybrid_model.stream("hello", depth=2, max_tokens=40)
    seen = [next(stream) for _ in range(5)]
    stream.close()
    assert seen
    assert hybrid_model.generate("hello", depth=2, max_tokens=40).tokens == full.tokens


def test_max_tokens_stop_strings_and_eos(echo_models):
    model = echo_models["qwen3_5"]
    res = model.generate([5, 7, 9], depth=4, max_tokens=7)
    assert len(res.tokens) == 7 and res.metrics.finish_reason == "length"
    full = model.generate([5, 7, 9], depth=0, max_tokens=40)
    stop = full.text[10:12]
    cut = model.generate([5, 7, 9], depth=3, max_tokens=40, stop=[stop])
    assert cut.metrics.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    # a stop string that starts in one token and ends in a later one never reaches the stream
    for start in range(3, 12):
        stop = full.text[start : start + 5]
        events = [e for e in model.stream([5, 7, 9], depth=3, max_tokens=40, stop=[stop]) if isinstance(e, mtpnb.TokenEvent)]
        streamed = "".join(e.text for e in events if e.kind != "rejected")
        assert streamed == full.text[: full.text.index(stop)], (start, stop)
    eos = full.tokens[5]
    model.tokenizer.eos_token_ids = {eos}
    try:
        ended = model.generate([5, 7, 9], depth=3, max_tokens=40)
    finally:
        model.tokenizer.eos_token_ids = set()
    assert ended.tokens == full.tokens[: full.tokens.index(eos)] and ended.metrics.finish_reason == "stop"


def test_chat_prompt_uses_the_template(hybrid_model):
    on = hybrid_model.tokenizer.decode(hybrid_model.engine.encode([{"role": "user", "content": "hi"}], reasoning=True))
    assert on.startswith("<|im_start|>user\nhi<|im_end|>") and on.endswith("<|im_start|>assistant\n")
    off = hybrid_model.tokenizer.decode(hybrid_model.engine.encode("hi", chat=True, reasoning=False))
    assert off == on + "<think>\n\n</think>\n\n"


def test_a_chat_template_that_refuses_the_messages_is_a_one_line_error(checkpoints, tmp_path):
    """Qwen's templates raise on a role they do not know; that is the caller's error, said in one line."""
    import json
    import shutil

    folder = shutil.copytree(checkpoints(family="qwen3_5"), tmp_path / "strict")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                               "{{ raise_exception('Unexpected message role.') }}{% endif %}{% endfor %}"
                               + config["chat_template"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = mtpnb.load(folder)
    assert model.generate([{"role": "system", "content": "hi"}, {"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(MTPNBError) as e:
        model.generate([{"role": "narrator", "content": "hi"}], max_tokens=2)
    assert str(e.value) == "strict's chat template refused the messages: Unexpected message role."


@pytest.mark.parametrize("params, message", [
    (dict(depth=-1), "depth"), (dict(depth=9), "depth"), (dict(depth=1.5), "depth"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_p=0.0), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(seed=-3), "seed"), (dict(stop=[""]), "stop"), (dict(depht=2), "unknown parameter"),
])
def test_bad_parameters_give_one_line_errors(hybrid_model, params, message):
    with pytest.raises(MTPNBError, match=message) as e:
        hybrid_model.generate("x", **params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prompt", ["", [], [1, -2], [10**6], [{"role": "user"}], 3.5])
def test_bad_prompts_give_one_line_errors(hybrid_model, prompt):
    with pytest.raises(MTPNBError) as e:
        hybrid_model.generate(prompt, max_tokens=3)
    assert "\n" not in str(e.value)


def test_depth_falls_back_to_plain_without_a_head(checkpoints):
    from conftest import load_quietly

    model = load_quietly(checkpoints(family="qwen3_5", mtp=None))
    res = model.generate("abc", depth=3, max_tokens=10)
    assert res.metrics.depth == 0 and {e.kind for e in res.events} == {"plain"}


def test_verify_kernel_switch_keeps_the_output(checkpoints):
    """The switch the benchmark flips: on the CPU the kernels defer to MLX's op, so the same tokens."""
    model = mtpnb.load(checkpoints(family="qwen3_5"), quantize=4, group_size=32)
    before = model.generate("abc", depth=2, max_tokens=20).tokens
    assert model.use_verify_kernels(True) > 0
    try:
        assert model.generate("abc", depth=2, max_tokens=20).tokens == before
    finally:
        model.use_verify_kernels(False)
    assert mtpnb.load(checkpoints(family="qwen3_5")).use_verify_kernels(True) == 0  # nothing quantized
