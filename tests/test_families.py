"""MTP families beyond dense Qwen3.5, each against transformers' own classes.

Every checkpoint here is written by transformers (random float32 weights, tiny dims, a few experts)
plus the MTP layer's tensors in the family's published layout (mtpnb.fixtures.make_hf_checkpoint).
Per family: mtpnb's greedy output is transformers' own `generate` output at depth 0 and the same at
depths 1-4; the head's logits match an independent torch reference of the published formula (built
on transformers' decoder layer of the family) within 1e-4; rollback gives the logits of a fresh
prefill for every keep count; quantized loading (experts included) round-trips.
"""

import collections

import mlx.core as mx
import numpy as np
import pytest

import mtpnb
from conftest import assert_rollback_matches_fresh_prefill

torch = pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
pytestmark = pytest.mark.torch

CASES = [("qwen3_5_moe", "per_expert"), ("qwen3_5_moe", "fused"), ("qwen3_next", "per_expert"),
         ("deepseek_v3", "per_expert"), ("glm4_moe", "per_expert"), ("mimo", "dense")]
PROMPT = [5, 17, 99, 3, 42, 250, 7]
PROMPTS = (PROMPT, [100, 3, 44])
IDS = [5, 17, 99, 3, 42, 250, 7, 7, 128, 64, 33, 2, 19, 200, 45, 9, 77, 130]


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    from mtpnb.fixtures import make_hf_checkpoint

    made = {}

    def get(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in made:
            made[key] = make_hf_checkpoint(tmp_path_factory.mktemp(family), family=family, **options)
        return made[key]

    return get


def load(path, **kwargs):
    model = mtpnb.load(path, **kwargs)
    model.tokenizer.eos_token_ids = set()
    return model


@pytest.mark.parametrize("family, experts", CASES)
def test_greedy_equals_transformers_generate_at_every_depth(hf_checkpoints, family, experts):
    """Echo head on a trunk that often repeats itself: drafts are right while the output repeats, so
    verifies keep every count of tokens."""
    from mtpnb.fixtures import hf_classes

    path = hf_checkpoints(family, experts=experts, head="echo", logit_scale=0.08)
    hf = hf_classes(family)[0].from_pretrained(path, dtype=torch.float32).eval()
    model = load(path)
    n = 32
    accepted = collections.Counter()
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        assert model.generate(prompt, depth=0, max_tokens=n).tokens == expected
        for depth in (1, 2, 3, 4):
            result = model.generate(prompt, depth=depth, max_tokens=n)
            assert result.tokens == expected, (prompt, depth)
            accepted.update(s.accepted for s in result.steps[1:])
    assert {0, 1, 2, 3, 4} <= set(accepted), accepted  # rejections, partial and full acceptance


class Reference:
    """A family's MTP layer from its published formula, in torch, on transformers' trunk and decoder
    layer of the family (fed transformers' in-memory fused experts)."""

    prefix = "mtp."

    def __init__(self, path, family):
        from safetensors.torch import load_file

        from mtpnb.fixtures import fuse_experts, hf_classes

        causal_lm, layer_class, index = hf_classes(family)
        self.hf = causal_lm.from_pretrained(path, dtype=torch.float32).eval()
        self.prefix = self.prefix.format(index=index)
        tensors = fuse_experts(load_file(path / "model.safetensors"))
        self.w = {k.removeprefix(self.prefix): v for k, v in tensors.items() if k.startswith(self.prefix)}
        self.layer = layer_class(self.hf.config, layer_idx=index).eval()
        self.layer.load_state_dict(self.layer_weights())
        self.eps = self.hf.config.rms_norm_eps

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def trunk(self, ids):
        hidden = self.hf.model(input_ids=ids).last_hidden_state
        return hidden, self.hf.lm_head(hidden)

    def run_layer(self, z):
        positions = self.hf.model.rotary_emb(z, torch.arange(z.shape[1])[None])
        return self.layer(z, position_embeddings=positions, attention_mask=None)  # SDPA: causal


class QwenReference(Reference):
    """Qwen3.5/3.6 MoE and Qwen3-Next (vLLM's qwen3_5_mtp.py, qwen3_next_mtp.py):

        e = RMSNorm_(1+w)(embed(x[t+1]));  h = RMSNorm_(1+w)(H[t])   # H: trunk state after its final norm
        z = decoder_layer(fc(cat[e, h]));  g = RMSNorm_(1+w)(z)      # g feeds the next step
        logits = lm_head(g)
    """

    def layer_weights(self):
        return {k.removeprefix("layers.0."): v for k, v in self.w.items() if k.startswith("layers.0.")}

    def norm(self, x, name):
        return self.rms(x, name) * (1.0 + self.w[f"{name}.weight"])

    def step(self, hidden, next_ids):
        e = self.norm(self.hf.model.embed_tokens(next_ids), "pre_fc_norm_embedding")
        h = self.norm(hidden, "pre_fc_norm_hidden")
        g = self.norm(self.run_layer(torch.nn.functional.linear(torch.cat([e, h], dim=-1), self.w["fc.weight"])), "norm")
        return g, self.hf.lm_head(g)


class NextNReference(Reference):
    """DeepSeek-V3 and GLM-4.5 (the DeepSeek-V3 report's MTP module; vLLM's deepseek_mtp.py):

        e = RMSNorm_w(embed(x[t+1]));  h = RMSNorm_w(H[t])          # enorm, hnorm: plain w
        z = decoder_layer(eh_proj(cat[e, h]))                        # z feeds the next step
        logits = shared_head.head(RMSNorm_w(z))                      # shared_head.norm
    """

    prefix = "model.layers.{index}."
    HEAD_PARTS = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")

    def layer_weights(self):
        return {k: v for k, v in self.w.items() if not k.startswith(self.HEAD_PARTS)}

    def norm(self, x, name):
        return self.rms(x, name) * self.w[f"{name}.weight"]

    def step(self, hidden, next_ids):
        e = self.norm(self.hf.model.embed_tokens(next_ids), "enorm")
        h = self.norm(hidden, "hnorm")
        z = self.run_layer(torch.nn.functional.linear(torch.cat([e, h], dim=-1), self.w["eh_proj.weight"]))
        logits = torch.nn.functional.linear(self.norm(z, "shared_head.norm"), self.w["shared_head.head.weight"])
        return z, logits


class MiMoReference(NextNReference):
    """MiMo (vLLM's mimo_mtp.py), its trunk and layer transformers' Qwen2 (transformers has no MiMo class):

        z = decoder_layer(input_proj(cat[RMSNorm_w(H[t]), RMSNorm_w(embed(x[t+1]))]))   # hidden first
        g = final_layernorm(z);  logits = lm_head(g)                                     # g feeds the next step
    """

    prefix = "model.mtp_layers.0."
    HEAD_PARTS = ("token_layernorm.", "hidden_layernorm.", "input_proj.", "final_layernorm.")

    def step(self, hidden, next_ids):
        e = self.norm(self.hf.model.embed_tokens(next_ids), "token_layernorm")
        h = self.norm(hidden, "hidden_layernorm")
        z = self.run_layer(torch.nn.functional.linear(torch.cat([h, e], dim=-1), self.w["input_proj.weight"]))
        g = self.norm(z, "final_layernorm")
        return g, self.hf.lm_head(g)


REFERENCES = {"qwen3_5_moe": QwenReference, "qwen3_next": QwenReference,
              "deepseek_v3": NextNReference, "glm4_moe": NextNReference, "mimo": MiMoReference}


@pytest.mark.parametrize("family, experts", CASES)
def test_head_logits_match_a_torch_reference(hf_checkpoints, family, experts):
    """Trunk and two head steps over a sequence, mtpnb on MLX vs the torch reference, within 1e-4."""
    path = hf_checkpoints(family, experts=experts)
    ref = REFERENCES[family](path, family)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        hidden, logits = ref.trunk(ids[:, :-2])
        g1, head1 = ref.step(hidden, ids[:, 1:-1])
        _, head2 = ref.step(g1, ids[:, 2:])
    model = load(path)
    mx_hidden, mx_logits = model.forward(mx.array(ids[:, :-2].numpy()))
    mx_g1, mx_head1 = model.mtp_forward(mx_hidden, mx.array(ids[:, 1:-1].numpy()))
    _, mx_head2 = model.mtp_forward(mx_g1, mx.array(ids[:, 2:].numpy()))
    for name, ours, theirs in [("trunk", logits, mx_logits), ("head step 1", head1, mx_head1),
                               ("head step 2", head2, mx_head2)]:
        assert np.abs(np.array(theirs) - ours.numpy()).max() < 1e-4, name
    assert np.abs(np.array(mx_head1)).max() > 1e-2  # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("family, stepwise", [("qwen3_5_moe", True), ("qwen3_next", True), ("qwen3_next", False),
                                              ("deepseek_v3", True), ("glm4_moe", True), ("mimo", True)])
def test_rollback_for_every_keep_count(hf_checkpoints, monkeypatch, family, stepwise):
    """Both Gated DeltaNet designs (per-step states kept during the verify; replay from the tape,
    Metal's path) on each family's own Gated DeltaNet layout; MLA's compressed-latent cache
    (DeepSeek-V3) and GQA's (GLM-4.5) trimmed in the trunk and the head."""
    from mtpnb import rollback

    monkeypatch.setattr(rollback, "_stepwise", lambda: stepwise)
    assert_rollback_matches_fresh_prefill(load(hf_checkpoints(family)))


@pytest.mark.parametrize("family, experts", [("qwen3_5_moe", "fused"), ("qwen3_next", "per_expert"),
                                             ("deepseek_v3", "per_expert"), ("glm4_moe", "per_expert"),
                                             ("mimo", "dense")])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading(hf_checkpoints, tmp_path, family, experts, bits):
    """The head is quantized with the trunk; experts (trunk and head) are quantized, the head's router
    as the trunk's (8 bits, or a float MoEGate for DeepSeek, as mlx-lm does); the saved folder loads
    back to the same model; greedy decoding is the same at every depth."""
    path = hf_checkpoints(family, experts=experts, head="echo")
    model = load(path, quantize=bits, group_size=32)

    def kinds(module):
        """The routed experts' layer types and bits."""
        return {(type(m).__name__, getattr(m, "bits", None)) for _, m in module.named_modules()
                if type(m).__name__.endswith("SwitchLinear")}

    def router(head_or_layer):
        return (type(head_or_layer.mlp.gate).__name__, getattr(head_or_layer.mlp.gate, "bits", None))

    again = load(mtpnb.save(model, tmp_path / "q"))
    if experts == "dense":
        assert {type(m).__name__ for _, m in again.head.named_modules()} >= {"QuantizedLinear"}
    else:
        assert kinds(model.trunk) == kinds(model.head) == {("QuantizedSwitchLinear", bits)}
        assert router(model.head.layers[0]) == router(model._inner.layers[-1])
        assert router(again.head.layers[0]) == router(model.head.layers[0]) and kinds(again.head) == kinds(model.head)
    hidden, logits = model.forward(mx.array([PROMPT]))
    hidden2, logits2 = again.forward(mx.array([PROMPT]))
    np.testing.assert_array_equal(np.array(logits), np.array(logits2))
    g = model.mtp_forward(hidden[:, :-1], mx.array([PROMPT[1:]]))[1]
    np.testing.assert_array_equal(np.array(g), np.array(again.mtp_forward(hidden2[:, :-1], mx.array([PROMPT[1:]]))[1]))
    plain = model.generate(PROMPT, depth=0, max_tokens=24).tokens
    assert all(again.generate(PROMPT, depth=d, max_tokens=24).tokens == plain for d in (0, 1, 3))


@pytest.mark.parametrize("family, key", [("qwen3_5_moe", "mtp_num_hidden_layers"),
                                         ("qwen3_next", "num_nextn_predict_layers"),
                                         ("deepseek_v3", "num_nextn_predict_layers")])
def test_several_mtp_layers_are_refused_not_dropped(hf_checkpoints, tmp_path, family, key):
    import json
    import shutil

    path = tmp_path / "several"
    shutil.copytree(hf_checkpoints(family, experts="per_expert"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: 2}))
    with pytest.raises(mtpnb.MTPNBError, match=f"{key} is 2: mtpnb runs one MTP layer") as e:
        mtpnb.load(path)
    assert "\n" not in str(e.value)
