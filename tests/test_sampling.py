"""Exactness of the acceptance rule on synthetic distributions (K = 3 drafts, vocabulary of 8).

Each case runs 100k independent verify steps at once (the batch dimension of accept_sampled) with
drafts really drawn from q, and checks with chi-square tests that the first emitted token follows
p_1, that the second one (when the first draft was kept) follows p_2, and that the acceptance rate
of the first draft is sum(min(p_1, q_1)). Seeds are fixed: the outcome is deterministic.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import binomtest, chisquare

from mtpnb.errors import MTPNBError
from mtpnb.sampling import Sampling, accept_greedy, accept_sampled, exp, logsumexp, sample

V, K, N = 8, 3, 100_000


def _dist(*values):
    a = np.array(values, dtype=np.float64)
    return a / a.sum()


rng = np.random.default_rng(0)
P = np.stack([_dist(*rng.random(V) ** 2) for _ in range(K + 1)])
CASES = {
    "p equals q": (P, P[:K].copy()),
    "disjoint supports": (
        np.stack([_dist(1, 2, 3, 4, 0, 0, 0, 0)] * (K + 1)),
        np.stack([_dist(0, 0, 0, 0, 4, 3, 2, 1)] * K),
    ),
    "one-hot q": (P, np.stack([np.eye(V)[j + 2] for j in range(K)])),
    "q zero where p positive": (P, np.stack([_dist(0, 0, 1, 1, 2, 0, 3, 1)] * K)),
    "random p and q": (P, np.stack([_dist(*rng.random(V)) for _ in range(K)])),
}


def _log(a):
    with np.errstate(divide="ignore"):
        return mx.array(np.log(a).astype(np.float32))


def _chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=V).astype(np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token with probability 0 was emitted"
    expected = probs[support] * counts.sum()
    return chisquare(counts[support], expected).pvalue


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_output_follows_p(case):
    p, q = CASES[case]
    draft_key, key = mx.random.split(mx.random.key(1234))
    q_lp = mx.broadcast_to(_log(q), (N, K, V))
    drafts = mx.random.categorical(q_lp, key=draft_key)  # drafts really drawn from q
    n_acc, token, p_d, q_d, p_tok = accept_sampled(mx.broadcast_to(_log(p), (N, K + 1, V)), q_lp, drafts, key)
    mx.eval(n_acc, token, drafts)
    n_acc, token, drafts = np.array(n_acc), np.array(token), np.array(drafts)

    first = np.where(n_acc >= 1, drafts[:, 0], token)
    assert _chi2_pvalue(first, p[0]) > 1e-3
    kept = n_acc >= 1
    if kept.sum() > 1000:
        second = np.where(n_acc[kept] >= 2, drafts[kept, 1], token[kept])
        assert _chi2_pvalue(second, p[1]) > 1e-3
    all_kept = n_acc == K
    if all_kept.sum() > 1000:  # the bonus token comes from p_K+1
        assert _chi2_pvalue(token[all_kept], p[K]) > 1e-3

    expected_rate = np.minimum(p[0], q[0]).sum()
    result = binomtest(int(kept.sum()), N, expected_rate)
    assert result.pvalue > 1e-3, (kept.mean(), expected_rate)


def test_p_and_q_of_drafts_are_reported():
    p, q = CASES["random p and q"]
    drafts = mx.array([3, 1, 7])
    _, _, p_d, q_d, _ = accept_sampled(_log(p), _log(q), drafts, mx.random.key(0))
    np.testing.assert_allclose(np.array(p_d), p[[0, 1, 2], [3, 1, 7]], rtol=1e-5)
    np.testing.assert_allclose(np.array(q_d), q[[0, 1, 2], [3, 1, 7]], rtol=1e-5)


def test_greedy_accepts_the_matching_prefix():
    logits = mx.array(np.log(np.stack([np.eye(V)[t] * 0.9 + 0.1 / V for t in (2, 5, 1, 6)])).astype(np.float32))
    draft_logits = logits[:K]
    for drafts, expected_n, expected_token in [([2, 5, 1], 3, 6), ([2, 5, 0], 2, 1), ([7, 5, 1], 0, 2)]:
        n, tok, *_ = accept_greedy(logits, draft_logits, mx.array(drafts))
        assert (n.item(), tok.item()) == (expected_n, expected_token)


def test_no_drafts_samples_from_p():
    p = _dist(*range(1, V + 1))
    lp = mx.broadcast_to(_log(p[None]), (N, 1, V))
    n, token, *_ = accept_sampled(lp, lp[:, :0], mx.zeros((N, 0), dtype=mx.int32), mx.random.key(3))
    assert np.all(np.array(n) == 0)
    assert _chi2_pvalue(np.array(token), p) > 1e-3


def test_sample_follows_p_and_never_draws_a_zero():
    """The inverse-CDF sampler (drafts, plain decoding, residuals): p's frequencies, no zero-p token,
    zeros at both ends of the vocabulary included."""
    p = _dist(0, 1, 0, 4, 2, 0, 3, 0)
    lp = mx.broadcast_to(_log(p), (N, V))
    tokens, probs = sample(lp, mx.random.key(11))
    assert _chi2_pvalue(np.array(tokens), p) > 1e-3
    np.testing.assert_allclose(np.array(probs), p[np.array(tokens)], rtol=1e-5)
    one_hot_at_either_end = sample(_log(np.eye(V)[[0, V - 1]]), mx.random.key(12))[0]
    assert np.all(np.array(one_hot_at_either_end) == [0, V - 1])


def test_exp_is_as_accurate_as_mlxs_and_exactly_zero_where_a_token_is_filtered():
    """sampling.exp (a polynomial: MLX's CPU exp is slow) against float64, beside mx.exp; -inf and
    results below float32's normal range are 0, as mx.exp gives them; logsumexp as mx.logsumexp."""
    x = np.linspace(-87, 88, 1_000_001, dtype=np.float32)  # float32's normal range
    want = np.exp(x.astype(np.float64))
    ours = np.abs(np.array(mx.compile(exp)(mx.array(x))) / want - 1).max()
    mlxs = np.abs(np.array(mx.exp(mx.array(x))) / want - 1).max()  # 3.9e-6: x * log2(e) rounds in float32
    assert ours < 5e-6 and ours < 1.1 * mlxs
    edges = mx.array([-mx.inf, -1e4, -88.0, -87.0, 0.0, 88.0])
    np.testing.assert_allclose(np.array(exp(edges)), np.exp(np.array([-np.inf, -1e4, -np.inf, -87.0, 0.0, 88.0])),
                               rtol=5e-6)
    rows = mx.array([[-mx.inf] * 4, [1.0, 2.0, 3.0, -mx.inf], [-500.0, -499.0, -mx.inf, -501.0]])
    assert np.array_equal(np.isneginf(np.array(logsumexp(rows))), [True, False, False])
    np.testing.assert_allclose(np.array(logsumexp(rows))[1:], np.array(mx.logsumexp(rows, axis=-1))[1:], rtol=1e-6)
    assert logsumexp(rows, keepdims=True).shape == (3, 1)


def test_processed_distribution_filters_then_tempers():
    logits = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0, -8.0]])
    lp = np.array(Sampling(temperature=0.7, top_k=3).logprobs(logits))[0]
    base = np.array(logits[0]) / 0.7
    expected = np.exp(base[:3] - np.logaddexp.reduce(base[:3]))
    np.testing.assert_allclose(np.exp(lp[:3]), expected, rtol=1e-5)
    assert np.all(np.isneginf(lp[3:]))
    top_p = np.exp(np.array(Sampling(temperature=1.0, top_p=0.5).logprobs(logits))[0])
    assert top_p[0] == pytest.approx(1.0)  # the top token alone holds >= 50% of the mass
    assert math.isclose(float(np.exp(np.array(Sampling(temperature=1.0, min_p=0.3).logprobs(logits))[0]).sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("settings", [dict(top_p=0.9, top_k=20), dict(min_p=0.05, top_k=50),
                                      dict(top_p=0.5, min_p=0.1, top_k=5), dict(top_p=0.99, top_k=3000)])
def test_top_k_first_filtering_equals_mlx_lm_chain(settings):
    """The fast path (filters judged within the k best tokens) keeps exactly what mlx-lm's
    top_p -> min_p -> top_k chain keeps, on peaked and flat distributions."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    mx.random.seed(5)
    for scale in (0.5, 3.0, 8.0):
        logits = mx.random.normal((4, 8192)) * scale
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chain = lp
        if settings.get("top_p", 1) < 1:
            chain = apply_top_p(chain, settings["top_p"])
        if settings.get("min_p", 0) > 0:
            chain = apply_min_p(chain, settings["min_p"])
        chain = apply_top_k(chain, settings["top_k"])
        expected = np.array(chain / 0.7 - mx.logsumexp(chain / 0.7, axis=-1, keepdims=True))
        got = np.array(Sampling(temperature=0.7, **settings).logprobs(logits))
        differ = np.isneginf(got) != np.isneginf(expected)
        if differ.any():  # only float rounding at the top-p boundary may disagree
            probs = np.exp(np.array(lp, dtype=np.float64))
            for row, col in zip(*np.nonzero(differ)):
                mass_before = probs[row][probs[row] > probs[row, col]].sum()
                assert abs(mass_before - settings["top_p"]) < 1e-5
        both = ~np.isneginf(got) & ~np.isneginf(expected)
        np.testing.assert_allclose(got[both], expected[both], atol=1e-4)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(top_k=2.5), dict(min_p=1.0)])
def test_bad_sampling_parameters_are_refused(bad):
    with pytest.raises(MTPNBError):
        Sampling(**bad)


def test_q_on_a_draft_vocabulary_decides_as_q_on_the_whole_vocabulary():
    """The engine keeps q on the draft vocabulary (its columns' token ids, q = 0 elsewhere): the same
    decision, token and probabilities as q brought to the whole vocabulary first, batch by batch."""
    p, _ = CASES["random p and q"]
    vocab = np.array([1, 2, 4, 6], dtype=np.int32)
    q_draft = np.stack([_dist(*rng.random(len(vocab))) for _ in range(K)])
    q_whole = np.zeros((K, V))
    q_whole[:, vocab] = q_draft
    draft_key, key = mx.random.split(mx.random.key(5))
    columns = mx.random.categorical(mx.broadcast_to(_log(q_draft), (1000, K, len(vocab))), key=draft_key)
    drafts = mx.array(vocab)[columns]
    p_lp = mx.broadcast_to(_log(p), (1000, K + 1, V))
    on_draft = accept_sampled(p_lp, mx.broadcast_to(_log(q_draft), (1000, K, len(vocab))), drafts, key, columns,
                              mx.array(vocab))
    on_whole = accept_sampled(p_lp, mx.broadcast_to(_log(q_whole), (1000, K, V)), drafts, key)
    for a, b in zip(on_draft, on_whole):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)
    logits = mx.array(rng.standard_normal((K + 1, V)).astype(np.float32))
    draft_logits = mx.array(rng.standard_normal((K, len(vocab))).astype(np.float32))
    whole_logits = mx.put_along_axis(mx.full((K, V), -mx.inf), mx.broadcast_to(mx.array(vocab), (K, len(vocab))),
                                     draft_logits, axis=-1)
    columns = mx.argmax(draft_logits, axis=-1)
    drafts = mx.array(vocab)[columns]
    for a, b in zip(accept_greedy(logits, draft_logits, drafts, columns), accept_greedy(logits, whole_logits, drafts)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)
