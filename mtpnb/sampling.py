"""The target distribution, and exact speculative acceptance (Leviathan et al. 2023, Chen et al. 2023).

One processing order for every path (plain decoding, drafting, verifying), mlx-lm's: the filters
top-p, then min-p, then top-k act on the untempered log-probabilities, and the temperature divides
what survives. `Sampling.logprobs` returns that distribution, normalized; plain decoding samples
from it, the head drafts from it, and the verify compares against it.

Acceptance of drafts d_1..d_K drawn from q_1..q_K against targets p_1..p_K+1:
accept d_j while u_j < p_j(d_j) / q_j(d_j); at the first rejection emit a sample of
normalize(max(0, p_j - q_j)) (p_j itself if that mass is ~0); if all are accepted emit a bonus
sample of p_K+1. The output then follows p exactly, and P(accept d_j) = sum(min(p_j, q_j)).
Greedy (temperature 0): accept while d_j == argmax p_j, then emit argmax p at the first mismatch.

Cost: MLX's CPU exp is slow (mlx 0.32 on x86-64: about 1.1 ms for 4 rows of 8k), so every pass over
the vocabulary goes through `exp` below, a polynomial in MLX ops, as accurate as mx.exp and about half
its time (benchmarks/sampler_exp.py); a pass over an 8k-152k vocabulary is still the price to count.
Filtering with top-k normalizes within the k survivors; the acceptance reads p and q at the drafts only
and builds the one row it samples from (residual or bonus), drawn by inverse CDF (`sample`: one exp pass)
instead of Gumbel-max (a uniform and two logs over the vocabulary).

Randomness comes in as an explicit key (`mx.random.key`), never from MLX's global random state: each
generation splits its own key for every draw, so a seeded one draws the same numbers whatever else
runs on the thread between its steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_p

from .params import check_sampling

RESIDUAL_EPS = 1e-7
_LOG2_E = 1 / math.log(2)
# 2**f on [-0.5, 0.5]: the Taylor coefficients ln(2)**i / i!, degree 6, highest first. With float32's
# rounding of x * log2(e), exp's relative error on [-87, 88] is at most 3.9e-6 against float64, as mx.exp's.
_EXP2_COEFFICIENTS = tuple(math.log(2) ** i / math.factorial(i) for i in range(6, -1, -1))


def exp(x: mx.array) -> mx.array:
    """e**x in float32 as 2**n * 2**f (n an integer, |f| <= 1/2, 2**f a polynomial), in elementwise MLX ops
    (mx.compile fuses them): faster than mx.exp on a CPU (see Cost above). For x up to 88
    (sampling's are log-probabilities and logits less their maximum: never above 0); below float32's
    normal range (x < -87.3, -inf included) exactly 0, as mx.exp gives: a filtered token keeps probability 0."""
    y = x.astype(mx.float32) * _LOG2_E
    n = mx.floor(mx.clip(y, -127.0, 127.0) + 0.5)
    f = y - n
    power = _EXP2_COEFFICIENTS[0]
    for c in _EXP2_COEFFICIENTS[1:]:
        power = power * f + c
    return mx.where(y < -126.0, 0.0, power * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32))


def logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """log(sum(e**x)) along an axis, through `exp`; -inf where every entry is -inf."""
    top = mx.max(x, axis=axis, keepdims=True)
    top = mx.where(top == -mx.inf, 0.0, top)
    out = mx.log(mx.sum(exp(x - top), axis=axis, keepdims=True)) + top
    return out if keepdims else mx.squeeze(out, axis=axis)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        checked = check_sampling(self.temperature, self.top_p, self.top_k, self.min_p)
        for name, value in zip(("temperature", "top_p", "top_k", "min_p"), checked):
            object.__setattr__(self, name, value)
        # One fused graph per shape instead of ~20 ops dispatched per call (the settings are constants).
        object.__setattr__(self, "logprobs", mx.compile(self._logprobs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def _logprobs(self, logits: mx.array) -> mx.array:
        """Normalized log-probabilities of the distribution sampled from, [..., V]; called as the
        compiled `self.logprobs`."""
        logprobs = logits.astype(mx.float32)
        if 0 < self.top_k < logits.shape[-1]:
            return self._top_k_first(logprobs)
        logprobs = logprobs - logsumexp(logprobs, axis=-1, keepdims=True)
        if self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        logprobs = logprobs * (1 / self.temperature)
        return logprobs - logsumexp(logprobs, axis=-1, keepdims=True)

    def _top_k_first(self, logprobs: mx.array) -> mx.array:
        """top-p, min-p and top-k, exactly as mlx-lm's chain applies them, then the temperature,
        without sorting or re-normalizing the whole vocabulary: each filter keeps a prefix of the
        tokens ranked by probability (top-p judged on the full distribution's mass), so their
        combination is the shortest prefix, and it lies within the k best tokens."""
        k = self.top_k
        if self.top_p < 1:  # the one pass over the vocabulary that top-p's mass needs
            logprobs = logprobs - logsumexp(logprobs, axis=-1, keepdims=True)
        index = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        best = mx.take_along_axis(logprobs, index, axis=-1)
        order = mx.argsort(-best, axis=-1)
        index, best = mx.take_along_axis(index, order, axis=-1), mx.take_along_axis(best, order, axis=-1)
        keep = mx.ones(best.shape, dtype=mx.bool_)
        if self.top_p < 1:
            mass_before = mx.cumsum(exp(best), axis=-1, inclusive=False)
            keep = keep & (mass_before < self.top_p)
        if self.min_p > 0:  # relative to the best token: no normalization needed
            keep = keep & (best >= best[..., :1] + math.log(self.min_p))
        best = mx.where(keep, best * (1 / self.temperature), -mx.inf)
        best = best - logsumexp(best, axis=-1, keepdims=True)
        filtered = mx.full(logprobs.shape, -mx.inf, dtype=logprobs.dtype)
        return mx.put_along_axis(filtered, index, best, axis=-1)


@mx.compile
def accept_sampled(p_logprobs: mx.array, q_logprobs: mx.array, drafts: mx.array, key: mx.array,
                   draft_columns: mx.array | None = None, draft_vocab: mx.array | None = None):
    """p_logprobs [..., K+1, V], q_logprobs [..., K, Vq], drafts [..., K] (int), a random key -> lazy
    arrays (n_accepted [...], next_token [...], p_drafts [..., K], q_drafts [..., K], p_next [...]).
    q may cover a draft vocabulary only (q = 0 elsewhere): `draft_vocab` [Vq] are its columns' token
    ids and `draft_columns` [..., K] the drafts' columns; both None when q covers the whole vocabulary.
    Leading batch dimensions are independent trials (the tests run 1e5 of them at once)."""
    K = drafts.shape[-1]
    accept_key, token_key = mx.random.split(key)
    p_drafts = exp(_at(p_logprobs[..., :K, :], drafts))
    q_drafts = exp(_at(q_logprobs, drafts if draft_columns is None else draft_columns))
    accepted = mx.random.uniform(shape=drafts.shape, key=accept_key) * q_drafts < p_drafts
    n_accepted = _leading_true(accepted)
    # Only the row where acceptance stopped is sampled from: the residual max(0, p - q) of the first
    # rejected draft, or p_K+1 itself for the bonus (there q is zero).
    p_row = exp(_at_row(p_logprobs, n_accepted))
    weights = p_row
    if K:
        q_row = exp(_at_row(q_logprobs, mx.minimum(n_accepted, K - 1)))
        if draft_vocab is not None:  # the one row brought to the whole vocabulary, zero elsewhere
            q_row = mx.put_along_axis(mx.zeros_like(p_row), mx.broadcast_to(draft_vocab, q_row.shape), q_row,
                                      axis=-1)
        residual = mx.where((n_accepted < K)[..., None], mx.maximum(p_row - q_row, 0), p_row)
        weights = mx.where(residual.sum(axis=-1, keepdims=True) > RESIDUAL_EPS, residual, p_row)
    next_token = _sample_weights(weights, token_key)
    return n_accepted, next_token, p_drafts, q_drafts, _at(p_row, next_token)


@mx.compile
def sample(logprobs: mx.array, key: mx.array):
    """A draw from normalized log-probabilities [..., V] (inverse CDF) with a random key -> lazy
    (token [...], its probability [...]): plain decoding's step when sampling, and the head's drafts."""
    probs = exp(logprobs)
    token = _sample_weights(probs, key)
    return token, _at(probs, token)


def _sample_weights(weights: mx.array, key: mx.array) -> mx.array:
    """Inverse-CDF draw from non-negative weights [..., V] (any scale) -> token ids [...]. The first
    index whose running sum exceeds u * total has a positive weight (float addition is monotone, and
    adding a zero weight leaves the sum unchanged); u * total rounding up to the total is clamped to
    the last positive weight."""
    cdf = mx.cumsum(weights, axis=-1)
    x = mx.random.uniform(shape=cdf.shape[:-1] + (1,), key=key) * cdf[..., -1:]
    token = mx.sum(cdf <= x, axis=-1)
    last_positive = weights.shape[-1] - 1 - mx.argmax(weights[..., ::-1] > 0, axis=-1)
    return mx.minimum(token, last_positive).astype(mx.uint32)


@mx.compile
def accept_greedy(logits: mx.array, draft_logits: mx.array, drafts: mx.array, draft_columns: mx.array | None = None):
    """logits [..., K+1, V] of the verify, draft_logits [..., K, Vq], drafts [..., K] -> lazy arrays
    shaped like accept_sampled's. p and q are the plain softmax probabilities, shown to the user
    (each from its logit and the row's logsumexp: no softmax over the whole vocabulary). The draft
    logits may cover a draft vocabulary only: `draft_columns` [..., K] are then the drafts' columns
    (None: the drafts themselves)."""
    K = drafts.shape[-1]
    logits = logits.astype(mx.float32)
    targets = mx.argmax(logits, axis=-1)
    n_accepted = _leading_true(drafts == targets[..., :K])
    next_token = _at(targets, n_accepted)
    log_z = logsumexp(logits, axis=-1)
    p_drafts = exp(_at(logits[..., :K, :], drafts) - log_z[..., :K])
    q_drafts = p_drafts  # no drafts: an empty array (logsumexp refuses empty input)
    if K:
        draft_logits = draft_logits.astype(mx.float32)
        columns = drafts if draft_columns is None else draft_columns
        q_drafts = exp(_at(draft_logits, columns) - logsumexp(draft_logits, axis=-1))
    p_next = exp(_at(_at_row(logits, n_accepted), next_token) - _at(log_z, n_accepted))
    return n_accepted, next_token, p_drafts, q_drafts, p_next


@mx.compile
def next_greedy(logits: mx.array):
    """Plain decoding's step, logits [..., V] -> lazy (token [...], its probability [...])."""
    logits = logits.astype(mx.float32)
    token = mx.argmax(logits, axis=-1)
    return token, exp(_at(logits, token) - logsumexp(logits, axis=-1))


def _leading_true(flags: mx.array) -> mx.array:
    """How many of the first flags along the last axis are all True."""
    return mx.sum(mx.cumprod(flags.astype(mx.int32), axis=-1), axis=-1)


def _at(values: mx.array, index: mx.array) -> mx.array:
    """values[..., index] for an index with one dimension fewer (or the same, for a row of indices)."""
    if index.ndim == values.ndim - 1:
        return mx.take_along_axis(values, index[..., None], axis=-1)[..., 0]
    return mx.take_along_axis(values, index, axis=-1)


def _at_row(values: mx.array, row: mx.array) -> mx.array:
    """values[..., row, :] -> [..., V]."""
    return mx.take_along_axis(values, row[..., None, None], axis=-2)[..., 0, :]
