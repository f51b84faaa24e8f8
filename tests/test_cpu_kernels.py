"""The CPU verify kernels (mtpnb.cpu_kernels): built and checked here, equal to MLX's and mlx-lm's
arithmetic, a verify's rows bitwise those of plain decoding, and MLX's own ops wherever they do not
apply or cannot be built."""

import collections
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.gated_delta import gated_delta_ops

import mtpnb
from mtpnb import cpu_kernels


def test_the_kernels_build_and_pass_their_check_here():
    status = cpu_kernels.status()
    assert status["enabled"], status["reason"]
    assert status["threads"] >= 1 and os.path.exists(status["path"])


@pytest.mark.parametrize("n, k", [(64, 64), (301, 173), (1152, 512)])
def test_small_matmul_is_mlx_matmul_and_each_row_is_that_of_a_call_alone(n, k):
    w = mx.random.normal((n, k), key=mx.random.key(n)) * 0.1
    for m in range(1, cpu_kernels.MAX_ROWS + 1):
        x = mx.random.normal((1, m, k), key=mx.random.key(k + m))
        got = cpu_kernels.linear(x, w)
        assert got.shape == (1, m, n) and got.dtype == mx.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w.T), rtol=1e-4, atol=1e-5)
        alone = [np.asarray(cpu_kernels.linear(x[:, i : i + 1], w)) for i in range(m)]
        assert np.array_equal(np.asarray(got), np.concatenate(alone, axis=1))  # bitwise


@pytest.mark.parametrize("n, k", [(301, 173), (1152, 512)])
def test_bfloat16_weights_give_bitwise_the_sums_of_their_float32_values(n, k):
    """A bf16 checkpoint loaded as float32: the kernel may read its matrices as bf16 (half the bytes)."""
    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, k), dtype=np.float32)
    assert cpu_kernels.bf16_halves(w) is None  # float32 values that bf16 cannot hold: no shortcut
    w = np.asarray(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
    halves = cpu_kernels.bf16_halves(w)
    assert halves.dtype == np.uint16 and halves.nbytes * 2 == w.nbytes
    lib = cpu_kernels.library()
    for m in range(1, cpu_kernels.MAX_ROWS + 1):
        x = rng.standard_normal((m, k), dtype=np.float32)
        assert np.array_equal(cpu_kernels._call(lib, x, halves), cpu_kernels._call(lib, x, w))


def test_a_layer_of_a_bf16_checkpoint_reads_its_weights_as_bf16_for_the_same_sums():
    """Loaded as float32 from bf16: the layer keeps a bf16 copy for the kernel (MLX keeps its float32
    one), and its output is bitwise the float32 kernel's; a float32-valued layer reads float32."""
    x = mx.random.normal((1, 4, 512), key=mx.random.key(7))
    for weight, read_as in ((mx.random.normal((1152, 512), key=mx.random.key(8)).astype(mx.bfloat16), np.uint16),
                            (mx.random.normal((1152, 512), key=mx.random.key(9)), np.float32)):
        layer = nn.Linear(512, 1152, bias=False)
        layer.weight = weight.astype(mx.float32)
        cpu_kernels.install(layer)
        assert cpu_kernels._host_weight(layer)[0].dtype == read_as and layer.weight.dtype == mx.float32
        assert mx.array_equal(layer(x), cpu_kernels.linear(x, layer.weight))  # the float32 kernel's sums
        assert ("(read as bfloat16: 1 MB of copies)" in cpu_kernels.describe(layer)) == (read_as is np.uint16)


def test_a_strided_weight_is_read_as_its_values_not_its_memory():
    w = mx.random.normal((64, 96), key=mx.random.key(5)).T  # a transposed view: [96, 64], column-major
    x = mx.random.normal((3, 64), key=mx.random.key(6))
    np.testing.assert_allclose(np.asarray(cpu_kernels.linear(x, w)), np.asarray(x @ w.T), rtol=1e-4, atol=1e-5)
    layer = nn.Linear(64, 96, bias=False)
    layer.weight = w
    cpu_kernels.install(layer)
    assert type(layer) is cpu_kernels.SmallBatchLinear
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ w.T), rtol=1e-4, atol=1e-5)


def test_what_the_kernel_does_not_take_is_mlx_matmul_exactly():
    w = mx.random.normal((96, 64), key=mx.random.key(1))
    for x in (mx.random.normal((9, 64), key=mx.random.key(2)),  # more rows than a verify
              mx.random.normal((2, 64), key=mx.random.key(3)).astype(mx.bfloat16)):
        assert mx.array_equal(cpu_kernels.linear(x, w.astype(x.dtype)), x @ w.astype(x.dtype).T)


def _recurrence_inputs(T, H=4, Dk=32, Dv=24, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (mx.array(rng.standard_normal((1, T, H, Dk), dtype=np.float32) * 0.2) for _ in range(2))
    v = mx.array(rng.standard_normal((1, T, H, Dv), dtype=np.float32))
    g, beta = (mx.array(rng.uniform(0.3, 1.0, (1, T, H)).astype(np.float32)) for _ in range(2))
    state = mx.array(rng.standard_normal((1, H, Dv, Dk), dtype=np.float32))
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T", [1, 5, 40])
def test_gated_delta_is_mlx_lms_recurrence(T):
    q, k, v, g, beta, state = _recurrence_inputs(T)
    y, last, state_after = cpu_kernels.gated_delta(q, k, v, g, beta, state)
    y_ref, last_ref = gated_delta_ops(q, k, v, g, beta, state)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(last), np.asarray(last_ref), rtol=1e-4, atol=1e-4)
    assert mx.array_equal(state_after(T), last)


def test_gated_delta_steps_at_once_equal_steps_one_by_one():
    """What makes a verify's state, a rollback's and plain decoding's the same bitwise: the outputs and
    states of one step at a time are those of all steps at once, and those that state_after(n) gives."""
    q, k, v, g, beta, state = _recurrence_inputs(6, seed=1)
    y_all, last_all, state_after = cpu_kernels.gated_delta(q, k, v, g, beta, state)
    s = state
    for t in range(6):
        y_t, s, _ = cpu_kernels.gated_delta(*(a[:, t : t + 1] for a in (q, k, v, g, beta)), s)
        assert mx.array_equal(y_t[:, 0], y_all[:, t]) and mx.array_equal(s, state_after(t + 1))
    assert mx.array_equal(s, last_all)


def test_a_loaded_model_uses_them_and_says_so(hybrid_model):
    info = hybrid_model.info()
    assert info["cpu_kernels"].startswith("on: ") and "Gated DeltaNet" in info["cpu_kernels"]
    kinds = {type(m).__name__ for m in hybrid_model.trunk.modules()}
    assert "SmallBatchLinear" in kinds and "Linear" not in kinds


def _head_cache_rows(head_cache) -> list[np.ndarray]:
    cache = head_cache.caches[0]
    return [np.asarray(a[..., : cache.offset, :]) for a in (cache.keys, cache.values)]


@pytest.mark.parametrize("pending, committed", [(1, 20), (4, 20), (3, 0)])
@pytest.mark.parametrize("which", ["default model (draft vocabulary)", "default model (and context rows)",
                                   "random qwen3_5 checkpoint"])
def test_the_head_kernel_drafts_what_the_head_drafts_step_by_step(checkpoints, which, pending, committed):
    """A round in C (step 0 over the pending rows, then three later steps) against the MLX head step by
    step: the same greedy drafts, logits within 1e-4, and step 0's rows in the head's cache as MLX leaves
    them (`committed` rows there before; none: a prompt of one token); sampled, the distributions the
    drafts are drawn from are Sampling's of the MLX head's logits. With context rows: a generation's
    vocabulary holding every token outside the shortlist too (mtpnb.model.DraftVocabulary)."""
    from mtpnb.engine import draft_token
    from mtpnb.sampling import Sampling

    model = mtpnb.load() if which.startswith("default") else mtpnb.load(checkpoints(family="qwen3_5"))
    vocabulary = None
    if which.endswith("context rows)"):  # the shortlist without the first 64 tokens, a context with them
        model.set_draft_vocab([t for t in model.draft_vocab.tolist() if t >= 64])
        vocabulary = model.draft_vocabulary(list(range(64)))
    ids_of = model.draft_vocab if vocabulary is None else vocabulary.ids  # each draft row's token
    # the default model is stored in bf16: its head's matrices are read as such; the random one's are float32
    steps = "the head's draft steps in C" + (" (its matrices read as bfloat16)" if which.startswith("default") else "")
    assert model.info()["cpu_kernels"].endswith("; " + steps)
    ids = [5, 7, 9, 11, 13, 17, 19, 23] * 3
    hidden, _ = model.forward(mx.array(ids[: committed + pending])[None], cache=model.make_cache())
    pending_hidden, pending_tokens = hidden[:, committed:], ids[committed + 1 : committed + pending] + [29]

    def head_cache_after_the_prefill():
        head_cache = model.make_head_cache()
        if committed:
            model.head(hidden[:, :committed], model.embed(mx.array(ids[1 : committed + 1])[None]), cache=head_cache)
            mx.eval(head_cache.state)
        return head_cache

    mlx_cache, greedy = head_cache_after_the_prefill(), Sampling(temperature=0.0)
    g = model.head(pending_hidden, model.embed(mx.array(pending_tokens)[None]), cache=mlx_cache)[:, -1:]
    step_by_step = [draft_token(model, greedy, g, None, step=0, vocabulary=vocabulary)]
    for j in range(1, 4):
        g = model.head(g, model.embed(step_by_step[-1][0].reshape(1, 1)), cache=mlx_cache, step=j)
        step_by_step.append(draft_token(model, greedy, g, None, step=j, vocabulary=vocabulary))
    mlx_cache.trim(3)  # the later steps' rows, as the engine's rollback takes them back
    want_columns = [column.item() for _, _, column in step_by_step]
    want_logits = np.stack([np.asarray(logits) for _, logits, _ in step_by_step])
    want_cache = _head_cache_rows(mlx_cache)
    assert mlx_cache.offset == committed + pending

    def assert_the_cache_is_mlxs(head_cache):
        assert head_cache.offset == mlx_cache.offset
        for got, want in zip(_head_cache_rows(head_cache), want_cache):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    in_c = head_cache_after_the_prefill()
    columns, logits = model.draft_round(pending_hidden, pending_tokens, in_c, 4, vocabulary).greedy()  # one call
    assert columns.tolist() == want_columns
    if vocabulary is not None:  # drafts from the context rows too
        assert max(want_columns) >= model.draft_vocab.size, ids_of[mx.array(want_columns)].tolist()
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)
    assert_the_cache_is_mlxs(in_c)

    # sampled: each step's draft drawn in C from the distribution it returns, which is what Sampling
    # makes of the MLX head's logits when the head is fed the same drafts (top-k; top-p and min-p alone,
    # where the kernel ranks the best 64 first and sorts the row only if their prefix may run past them)
    for settings in (Sampling(temperature=0.7, top_p=0.9, top_k=20), Sampling(temperature=0.7, top_p=0.9),
                     Sampling(temperature=1.0, min_p=0.02)):
        in_c = head_cache_after_the_prefill()
        columns, q = model.draft_round(pending_hidden, pending_tokens, in_c, 4, vocabulary).sampled(
            settings.temperature, settings.top_p, settings.min_p, settings.top_k, mx.array([0.1, 0.5, 0.9, 0.3]))
        assert_the_cache_is_mlxs(in_c)
        fed_cache = head_cache_after_the_prefill()
        g = model.head(pending_hidden, model.embed(mx.array(pending_tokens)[None]), cache=fed_cache)[:, -1:]
        want = [settings.logprobs(model.draft_logits(g, 0, vocabulary)[0, -1])]
        for j, column in enumerate(columns.tolist()[:-1], start=1):
            token = column if ids_of is None else ids_of[column].item()
            g = model.head(g, model.embed(mx.array([[token]])), cache=fed_cache, step=j)
            want.append(settings.logprobs(model.draft_logits(g, j, vocabulary)[0, -1]))
        got, want = np.asarray(q), np.stack([np.asarray(w) for w in want])
        survivors = np.isfinite(want)
        assert (np.isfinite(got) == survivors).all() and survivors[np.arange(4), np.asarray(columns)].all()
        np.testing.assert_allclose(got[survivors], want[survivors], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature, top_p, min_p, top_k", [(1.0, 1.0, 0.0, 8), (0.8, 0.9, 0.0, 0),
                                                               (1.2, 1.0, 0.05, 0), (1.0, 1.0, 0.0, 0)])
def test_the_head_kernel_draws_its_drafts_from_the_distribution_it_returns(checkpoints, temperature, top_p, min_p,
                                                                           top_k):
    """3000 draws of a round's first draft (the same head state, uniform numbers from a seeded generator)
    follow the q the kernel returns with them (chi-square): the acceptance, which reads q, is then exact.
    Each way the kernel ranks the tokens: the k best, all sorted (top-p or min-p without top-k), none."""
    from scipy.stats import chisquare

    model = mtpnb.load(checkpoints(family="qwen3_5"))
    ids = [5, 7, 9, 11, 13, 17]
    hidden, _ = model.forward(mx.array(ids)[None], cache=model.make_cache())
    head_cache = model.make_head_cache()
    model.head(hidden[:, :-1], model.embed(mx.array(ids[1:])[None]), cache=head_cache)
    counts, q = collections.Counter(), None
    for u in np.random.default_rng(0).random(3000, dtype=np.float32):
        column, dist = model.draft_round(hidden[:, -1:], [19], head_cache, 1).sampled(
            temperature, top_p, min_p, top_k, mx.array([float(u)]))
        for layer_cache in head_cache.caches:  # the drafting row's K and V, as a verify's rollback
            layer_cache.trim(1)
        assert q is None or np.array_equal(np.asarray(dist[0]), q)
        q = np.asarray(dist[0])
        counts[column.item()] += 1
    p = np.exp(q.astype(np.float64))
    assert set(counts) <= set(np.flatnonzero(p)) and abs(p.sum() - 1) < 1e-5
    expected, observed = 3000 * p / p.sum(), np.array([counts[i] for i in range(len(p))])
    big = expected >= 5  # cells too small for the chi-square approximation are pooled
    assert big.sum() >= 5, "the draft distribution is too concentrated to say anything"
    observed, expected = observed[big].tolist(), expected[big].tolist()
    if (pooled := 3000 - sum(expected)) > 1e-6:
        observed.append(3000 - sum(observed))
        expected.append(pooled)
    assert chisquare(observed, expected).pvalue > 1e-3


def test_turning_them_off_keeps_the_greedy_text(checkpoints):
    """Kernel and MLX differ only in rounding: on a random model the greedy tokens agree."""
    model = mtpnb.load(checkpoints(family="qwen3_5"))
    with_kernel = model.generate([5, 7, 9], depth=3, max_tokens=40).tokens
    assert cpu_kernels.uninstall(model.trunk, model.head) > 0
    try:
        assert model.generate([5, 7, 9], depth=3, max_tokens=40).tokens[:20] == with_kernel[:20]
    finally:
        cpu_kernels.install(model.trunk, model.head)


@pytest.mark.parametrize("env, why", [({"CC": "/nonexistent/cc"}, "no C compiler"),
                                      ({"MTPNB_NO_CPU_KERNEL": "1"}, "MTPNB_NO_CPU_KERNEL is set")])
def test_without_a_compiler_mlx_runs_after_one_line_saying_why(checkpoints, tmp_path, env, why):
    code = (
        "import warnings, mtpnb\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    m = mtpnb.load({str(checkpoints(family='qwen3_5'))!r})\n"
        "    r = m.generate([5, 7, 9], depth=3, max_tokens=8)\n"
        "print(len(r.tokens)); print(m.info()['cpu_kernels'])\n"
        "print([str(x.message) for x in w if 'CPU verify kernels' in str(x.message)])\n"
    )
    env = {**os.environ, "MTPNB_CACHE_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    tokens, described, warned = done.stdout.strip().splitlines()
    assert tokens == "8" and described.startswith("off (") and why in described
    if "CC" in env:
        assert why in warned and "MLX's ops run instead" in warned and "\\n" not in warned


def test_a_compiler_that_refuses_march_native_still_builds_them(tmp_path):
    fussy = tmp_path / "fussy-cc"
    fussy.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec cc "$@"\n')
    fussy.chmod(0o755)
    code = "from mtpnb import cpu_kernels; s = cpu_kernels.status(); print(s['enabled'], s['reason'])"
    env = {**os.environ, "MTPNB_CACHE_DIR": str(tmp_path / "cache"), "CC": str(fussy)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["True", "None"], done.stdout + done.stderr


@pytest.mark.parametrize("user, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                            ({"OMP_WAIT_POLICY": "active"}, None)])
def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise(user, expected):
    # Loaded with libgomp's default spin, the matmuls of a decode step took 6x as long beside two busy
    # processes on 2 cores: the waiting thread held the core its descheduled peer needed.
    code = "import os; from mtpnb import cpu_kernels; cpu_kernels.library(); print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **user}, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == [str(expected)], done.stdout + done.stderr
