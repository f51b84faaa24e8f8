"""The CPU verify kernels (mtpnb.cpu_kernels): built and checked here, equal to MLX's and mlx-lm's
arithmetic, a verify's rows bitwise those of plain decoding, and MLX's own ops wherever they do not
apply or cannot be built."""

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
    y, last, states = cpu_kernels.gated_delta(q, k, v, g, beta, state, keep_states=True)
    y_ref, last_ref = gated_delta_ops(q, k, v, g, beta, state)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(last), np.asarray(last_ref), rtol=1e-4, atol=1e-4)
    assert len(states) == T and mx.array_equal(states[-1], last)


def test_gated_delta_steps_at_once_equal_steps_one_by_one():
    """What makes a verify's state, a rollback's and plain decoding's the same bitwise."""
    q, k, v, g, beta, state = _recurrence_inputs(6, seed=1)
    y_all, last_all, states = cpu_kernels.gated_delta(q, k, v, g, beta, state, keep_states=True)
    s = state
    for t in range(6):
        y_t, s, _ = cpu_kernels.gated_delta(*(a[:, t : t + 1] for a in (q, k, v, g, beta)), s)
        assert mx.array_equal(y_t[:, 0], y_all[:, t]) and mx.array_equal(s, states[t])


def test_a_loaded_model_uses_them_and_says_so(hybrid_model):
    info = hybrid_model.info()
    assert info["cpu_kernels"].startswith("on: ") and "Gated DeltaNet" in info["cpu_kernels"]
    kinds = {type(m).__name__ for m in hybrid_model.trunk.modules()}
    assert "SmallBatchLinear" in kinds and "Linear" not in kinds


@pytest.mark.parametrize("which", ["default model (draft vocabulary)", "random qwen3_5 checkpoint"])
def test_the_head_kernel_drafts_what_the_head_drafts_step_by_step(checkpoints, which):
    from mtpnb.engine import draft_token
    from mtpnb.sampling import Sampling

    model = mtpnb.load() if which.startswith("default") else mtpnb.load(checkpoints(family="qwen3_5"))
    assert model.info()["cpu_kernels"].endswith("; the head's draft steps after the first in C")
    ids = [5, 7, 9, 11, 13, 17, 19, 23] * 3
    hidden, _ = model.forward(mx.array(ids)[None], cache=model.make_cache())
    head_cache = model.make_head_cache()
    g = model.head(hidden, model.embed(mx.array(ids[1:] + [29])[None]), cache=head_cache)[:, -1:]
    greedy = Sampling(temperature=0.0)
    first, _, _ = draft_token(model, greedy, g, None, step=0)
    step_by_step, h, draft = [], g, first
    for j in range(1, 4):
        h = model.head(h, model.embed(draft.reshape(1, 1)), cache=head_cache, step=j)
        draft, logits, column = draft_token(model, greedy, h, None, step=j)
        step_by_step.append((draft, logits, column.item()))
    head_cache.trim(3)
    committed = head_cache.offset
    want = np.stack([np.asarray(lg) for _, lg, _ in step_by_step])

    columns, logits = model.draft_round(g, head_cache, 3).greedy(first)  # greedy: the three in one call
    assert columns.tolist() == [c for _, _, c in step_by_step]
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
    one_by_one = model.draft_round(g, head_cache, 3)  # sampling: one call a step, the caller drawing
    previous = [first] + [d for d, _, _ in step_by_step[:-1]]
    got = np.stack([np.asarray(one_by_one.step(token)) for token in previous])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="has 0 left"):
        one_by_one.step(first)
    assert head_cache.offset == committed  # their rows never enter the cache


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
