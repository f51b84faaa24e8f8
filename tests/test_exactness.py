"""End to end: MTP sampling reproduces the model's own distribution.

On a tiny float32 hybrid model with a vocabulary of 16 and a random (poor) head, the exact joint
distribution of the first three generated tokens under plain sampling is enumerated (16^3
sequences, by batched forwards), and the empirical joint of the speculative engine at depth 1 and
depth 3 (also with a draft vocabulary) is compared with it by a chi-square test. The same at T=1 on a
mixture-of-experts model (Qwen3.5 MoE, written by transformers), whose verify routes every row to its
own experts. The seed is fixed: the outcome is deterministic.
"""

import collections
import tempfile

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

import mtpnb
from mtpnb.sampling import Sampling

V = 16
PROMPT = [3, 5]
SETTINGS = dict(temperature=0.8, top_k=12)
RUNS = 2000


@pytest.fixture(scope="module")
def model(checkpoints):
    m = mtpnb.load(checkpoints(family="qwen3_5", vocab_size=V, logit_scale=1.0, seed=4))
    m.tokenizer.eos_token_ids = set()
    return m


@pytest.mark.torch
def test_mtp_sampling_on_a_moe_model_matches_plain_sampling_joint():
    pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.fixtures import make_hf_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        model = mtpnb.load(make_hf_checkpoint(folder, vocab_size=V, tie=True, logit_scale=2.0, seed=4))
    model.tokenizer.eos_token_ids = set()
    run_and_compare(model, depth=3, settings=dict(temperature=1.0))


def exact_joint(model, settings=SETTINGS) -> np.ndarray:
    sampling = Sampling(**settings)

    def probs(prefixes):
        _, logits = model.forward(mx.array(prefixes))
        return np.exp(np.array(sampling.logprobs(logits[:, -1]), dtype=np.float64))

    p1 = probs([PROMPT])[0]
    p2 = probs([PROMPT + [a] for a in range(V)])
    p3 = probs([PROMPT + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize("depth, draft_vocab, context", [(1, None, 0), (3, None, 0),
                                                         (3, [1, 2, 4, 6, 9, 11, 13, 15], 0),
                                                         (3, [1, 2, 4, 6, 9, 11, 13, 15], 1024)])
def test_mtp_sampling_matches_plain_sampling_joint(model, depth, draft_vocab, context):
    """draft_vocab: the head drafts from half the vocabulary (q = 0 on the rest), so the residual
    also has to produce the tokens the head can never propose; with `context`, also from the prompt's
    and the first token's tokens outside it, so that q's support differs from one generation to the next."""
    model.set_draft_vocab(draft_vocab, context=context)
    try:
        run_and_compare(model, depth)
    finally:
        model.set_draft_vocab(None)


def run_and_compare(model, depth, settings=SETTINGS):
    joint = exact_joint(model, settings)
    assert joint.sum() == pytest.approx(1.0, abs=1e-5)
    mx.random.seed(2024 + depth)
    counts = collections.Counter()
    kinds = collections.Counter()
    for _ in range(RUNS):
        res = model.generate(PROMPT, depth=depth, max_tokens=3, **settings)
        counts[tuple(res.tokens)] += 1
        kinds.update(e.kind for e in res.events)
    assert kinds["rejected"] > 100 and kinds["correction"] > 100 and kinds["accepted"] > 100, kinds

    expected = joint.reshape(-1) / joint.sum() * RUNS  # float32 probabilities sum to 1 +- 1e-6
    observed = np.zeros(V**3)
    for (a, b, c), n in counts.items():
        observed[(a * V + b) * V + c] = n
    assert observed[expected == 0].sum() == 0, "a sequence of probability 0 was generated"
    big = expected >= 5  # cells too small for the chi-square approximation are pooled
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert big.sum() >= 20, "the test distribution is too concentrated to say anything"
    assert chisquare(obs, exp).pvalue > 1e-3
