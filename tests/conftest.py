import warnings

import pytest

import mtpnb
from mtpnb.fixtures import make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Folder factory: one random checkpoint per set of options, written once per session."""
    made = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **options)
        return made[key]

    return get


@pytest.fixture(scope="session")
def hybrid_model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3_5"))


@pytest.fixture(scope="session")
def attention_model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3"))


def load_quietly(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtpnb.load(path, **kw)


ROLLBACK_DESIGNS = ("kernel", "stepwise", "replay")


def use_rollback_design(monkeypatch, design: str) -> None:
    """How a Gated DeltaNet layer gets back to the state after a verify's first m steps: "kernel", the
    CPU kernel running them again (the default here); "stepwise", mlx-lm's ops one step at a time
    keeping every state (CUDA's path); "replay", mlx-lm's gated_delta_update running them again
    (Metal's path). The last two with the CPU kernel's recurrence switched off."""
    from mtpnb import cpu_kernels, rollback

    if design != "kernel":
        monkeypatch.setattr(cpu_kernels, "gated_delta_applies", lambda *arrays: False)
        monkeypatch.setattr(rollback, "_stepwise", lambda: design == "stepwise")


def assert_rollback_matches_fresh_prefill(model, prompt=(11, 42, 7, 99, 3, 150), verify=(21, 33, 8, 77, 120),
                                          follow=64):
    """After keeping m of D+1 verified tokens (every m), trunk and head caches give the next logits
    of a fresh prefill of the committed tokens (float32, atol 1e-5). With several MTP layers, every
    layer's cache is checked: a draft step on layer k after the committed positions gives what layer k
    computes over those positions and that row, uncached."""
    import mlx.core as mx
    import numpy as np

    from mtpnb.rollback import rollback_cache

    prompt, verify = list(prompt), list(verify)  # verify: the last committed token and D drafts
    D = len(verify) - 1
    layers = len(model.head.layers)
    for keep in range(1, D + 2):
        cache, head_cache = model.make_cache(), model.make_head_cache()
        hidden, _ = model.forward(mx.array([prompt]), cache=cache)
        model.mtp_forward(hidden, mx.array([prompt[1:] + [verify[0]]]), cache=head_cache)
        # D - 1 speculative head steps, as drafting does, then the verify
        g = hidden[:, -1:]
        for step, d in enumerate(verify[1:D], start=1):
            g, _ = model.mtp_forward(g[:, -1:], mx.array([[d]]), cache=head_cache, step=step)
        hidden_v, _ = model.forward(mx.array([verify]), cache=cache)
        rollback_cache(cache, keep=keep, discard=len(verify) - keep)
        head_cache.trim(D - 1)
        _, logits = model.forward(mx.array([[follow]]), cache=cache)
        committed = prompt + verify[:keep]
        fresh_hidden, fresh_logits = model.forward(mx.array([committed + [follow]]))
        np.testing.assert_allclose(np.array(logits[0, -1]), np.array(fresh_logits[0, -1]), atol=1e-5)
        # head: the kept positions enter its caches, then one more step must match a fresh head pass
        g, head_logits = model.mtp_forward(hidden_v[:, :keep], mx.array([verify[1:keep] + [follow]]), cache=head_cache)
        full = committed + [follow]
        fresh_g, fresh_head = model.mtp_forward(fresh_hidden[:, :-1], mx.array([full[1:]]))
        np.testing.assert_allclose(np.array(head_logits[0, -1]), np.array(fresh_head[0, -1]), atol=1e-5)
        for step in range(1, layers):  # layer k's cache: the committed rows, then a draft row of its own
            _, drafted = model.mtp_forward(g[:, -1:], mx.array([[verify[0]]]), cache=head_cache, step=step)
            rows = mx.concatenate([fresh_hidden[:, :-1], fresh_g[:, -1:]], axis=1)
            _, fresh_drafted = model.mtp_forward(rows, mx.array([full[1:] + [verify[0]]]), step=step)
            np.testing.assert_allclose(np.array(drafted[0, -1]), np.array(fresh_drafted[0, -1]), atol=1e-5)

