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
from conftest import assert_rollback_matches_fresh_prefill, use_rollback_design

torch = pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
pytestmark = pytest.mark.torch

CASES = [("qwen3_5_moe", "per_expert", 1), ("qwen3_5_moe", "fused", 1), ("qwen3_next", "per_expert", 1),
         ("deepseek_v3", "per_expert", 1), ("glm4_moe", "per_expert", 1), ("mimo", "dense", 1),
         # two MTP layers, draft step j running layer j % 2: Qwen's shared fc and norms, DeepSeek's and
         # MiMo's whole modules
         ("qwen3_5_moe", "per_expert", 2), ("deepseek_v3", "per_expert", 2), ("mimo", "dense", 2)]
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


@pytest.mark.parametrize("family, experts, mtp_layers", CASES)
def test_greedy_equals_transformers_generate_at_every_depth(hf_checkpoints, family, experts, mtp_layers):
    """Echo head on a trunk that often repeats itself: drafts are right while the output repeats, so
    verifies keep every count of tokens."""
    from mtpnb.fixtures import hf_classes

    path = hf_checkpoints(family, experts=experts, head="echo", logit_scale=0.08, mtp_layers=mtp_layers)
    hf = hf_classes(family)[0].from_pretrained(path, dtype=torch.float32).eval()
    model = load(path)
    assert len(model.head.layers) == mtp_layers
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
    """A family's MTP layers from their published formula, in torch, on transformers' trunk and decoder
    layer of the family (fed transformers' in-memory fused experts). With n MTP layers, head step k
    runs layer k % n (vLLM's `spec_step_idx % num_mtp_layers`)."""

    def __init__(self, path, family):
        from safetensors.torch import load_file

        from mtpnb.fixtures import fuse_experts, hf_classes

        causal_lm, layer_class, index = hf_classes(family)
        self.hf = causal_lm.from_pretrained(path, dtype=torch.float32).eval()
        config = self.hf.config
        self.n = getattr(config, "mtp_num_hidden_layers", None) or getattr(config, "num_nextn_predict_layers", 1)
        tensors = fuse_experts(load_file(path / "model.safetensors"))
        self.own, self.layers = [], []
        for k in range(self.n):
            own, layer_weights = self.split(tensors, index, k)
            layer = layer_class(config, layer_idx=self.layer_index(index, k)).eval()
            layer.load_state_dict(layer_weights)
            self.own.append(own)
            self.layers.append(layer)
        self.eps = config.rms_norm_eps

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def trunk(self, ids):
        hidden = self.hf.model(input_ids=ids).last_hidden_state
        return hidden, self.hf.lm_head(hidden)

    def run_layer(self, k, z):
        positions = self.hf.model.rotary_emb(z, torch.arange(z.shape[1])[None])
        return self.layers[k](z, position_embeddings=positions, attention_mask=None)  # SDPA: causal


class QwenReference(Reference):
    """Qwen3.5/3.6 MoE and Qwen3-Next (vLLM's qwen3_5_mtp.py, qwen3_next_mtp.py):

        e = RMSNorm_(1+w)(embed(x[t+1]));  h = RMSNorm_(1+w)(H[t])   # H: trunk state after its final norm
        z = layers[k](fc(cat[e, h]));  g = RMSNorm_(1+w)(z)          # g feeds the next step
        logits = lm_head(g)                                          # fc and the norms shared by the layers
    """

    def split(self, tensors, index, k):
        w = {n.removeprefix("mtp."): v for n, v in tensors.items() if n.startswith("mtp.")}
        own = {n: v for n, v in w.items() if not n.startswith("layers.")}
        return own, {n.removeprefix(f"layers.{k}."): v for n, v in w.items() if n.startswith(f"layers.{k}.")}

    def layer_index(self, index, k):
        return index  # a full-attention layer

    def norm(self, x, k, name):
        return self.rms(x) * (1.0 + self.own[k][f"{name}.weight"])

    def step(self, hidden, next_ids, step=0):
        k = step % self.n
        e = self.norm(self.hf.model.embed_tokens(next_ids), k, "pre_fc_norm_embedding")
        h = self.norm(hidden, k, "pre_fc_norm_hidden")
        z = self.run_layer(k, torch.nn.functional.linear(torch.cat([e, h], dim=-1), self.own[k]["fc.weight"]))
        g = self.norm(z, k, "norm")
        return g, self.hf.lm_head(g)


class NextNReference(Reference):
    """DeepSeek-V3 and GLM-4.5 (the DeepSeek-V3 report's MTP module; vLLM's deepseek_mtp.py), module k
    at `model.layers.{N + k}`:

        e = RMSNorm_w(embed(x[t+1]));  h = RMSNorm_w(H[t])          # enorm, hnorm: plain w
        z = decoder_layer(eh_proj(cat[e, h]))                        # z feeds the next step
        logits = shared_head.head(RMSNorm_w(z))                      # shared_head.norm
    """

    prefix = "model.layers.{layer}."
    HEAD_PARTS = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")

    def split(self, tensors, index, k):
        prefix = self.prefix.format(layer=self.layer_index(index, k))
        w = {n.removeprefix(prefix): v for n, v in tensors.items() if n.startswith(prefix)}
        return ({n: v for n, v in w.items() if n.startswith(self.HEAD_PARTS)},
                {n: v for n, v in w.items() if not n.startswith(self.HEAD_PARTS)})

    def layer_index(self, index, k):
        return index + k

    def norm(self, x, k, name):
        return self.rms(x) * self.own[k][f"{name}.weight"]

    def step(self, hidden, next_ids, step=0):
        k = step % self.n
        e = self.norm(self.hf.model.embed_tokens(next_ids), k, "enorm")
        h = self.norm(hidden, k, "hnorm")
        z = self.run_layer(k, torch.nn.functional.linear(torch.cat([e, h], dim=-1), self.own[k]["eh_proj.weight"]))
        logits = torch.nn.functional.linear(self.norm(z, k, "shared_head.norm"), self.own[k]["shared_head.head.weight"])
        return z, logits


class MiMoReference(NextNReference):
    """MiMo (vLLM's mimo_mtp.py), its trunk and layer transformers' Qwen2 (transformers has no MiMo class),
    layer k at `model.mtp_layers.{k}`:

        z = decoder_layer(input_proj(cat[RMSNorm_w(H[t]), RMSNorm_w(embed(x[t+1]))]))   # hidden first
        g = final_layernorm(z);  logits = lm_head(g)                                     # g feeds the next step
    """

    prefix = "model.mtp_layers.{layer}."
    HEAD_PARTS = ("token_layernorm.", "hidden_layernorm.", "input_proj.", "final_layernorm.")

    def layer_index(self, index, k):
        return k

    def step(self, hidden, next_ids, step=0):
        k = step % self.n
        e = self.norm(self.hf.model.embed_tokens(next_ids), k, "token_layernorm")
        h = self.norm(hidden, k, "hidden_layernorm")
        z = self.run_layer(k, torch.nn.functional.linear(torch.cat([h, e], dim=-1), self.own[k]["input_proj.weight"]))
        g = self.norm(z, k, "final_layernorm")
        return g, self.hf.lm_head(g)


REFERENCES = {"qwen3_5_moe": QwenReference, "qwen3_next": QwenReference,
              "deepseek_v3": NextNReference, "glm4_moe": NextNReference, "mimo": MiMoReference}


@pytest.mark.parametrize("family, experts, mtp_layers", CASES)
def test_head_logits_match_a_torch_reference(hf_checkpoints, family, experts, mtp_layers):
    """Trunk and three head steps over a sequence (each step's output feeding the next, step k on
    layer k % n), mtpnb on MLX vs the torch reference, within 1e-4."""
    path = hf_checkpoints(family, experts=experts, mtp_layers=mtp_layers)
    ref = REFERENCES[family](path, family)
    assert ref.n == mtp_layers
    ids = torch.tensor([IDS])
    length = len(IDS) - 3
    model = load(path)
    with torch.no_grad():
        hidden, logits = ref.trunk(ids[:, :length])
    mx_hidden, mx_logits = model.forward(mx.array(ids[:, :length].numpy()))
    compared = [("trunk", logits, mx_logits)]
    for step in range(3):
        next_ids = ids[:, step + 1: step + 1 + length]
        with torch.no_grad():
            hidden, head = ref.step(hidden, next_ids, step)
        mx_hidden, mx_head = model.mtp_forward(mx_hidden, mx.array(next_ids.numpy()), step=step)
        compared.append((f"head step {step + 1}", head, mx_head))
    for name, ours, theirs in compared:
        assert np.abs(np.array(theirs) - ours.numpy()).max() < 1e-4, name
    assert all(np.abs(np.array(theirs)).max() > 1e-2 for _, _, theirs in compared)  # not near-zero arrays


@pytest.mark.parametrize("family, design, mtp_layers", [
    ("qwen3_5_moe", "kernel", 1), ("qwen3_next", "kernel", 1), ("qwen3_next", "stepwise", 1),
    ("qwen3_next", "replay", 1), ("deepseek_v3", "kernel", 1), ("glm4_moe", "kernel", 1), ("mimo", "kernel", 1),
    ("qwen3_5_moe", "kernel", 2), ("deepseek_v3", "kernel", 2), ("mimo", "kernel", 2)])
def test_rollback_for_every_keep_count(hf_checkpoints, monkeypatch, family, design, mtp_layers):
    """Every Gated DeltaNet design (conftest.use_rollback_design) on each family's own Gated DeltaNet
    layout; MLA's compressed-latent cache (DeepSeek-V3) and GQA's (GLM-4.5) trimmed in the trunk and
    the head; with two MTP layers, each layer's cache keeps exactly the committed positions."""
    use_rollback_design(monkeypatch, design)
    assert_rollback_matches_fresh_prefill(load(hf_checkpoints(family, mtp_layers=mtp_layers)))


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
        block = getattr(model.head.layers[0], "block", model.head.layers[0])  # DeepSeek/GLM: the module's layer
        block_again = getattr(again.head.layers[0], "block", again.head.layers[0])
        assert router(block) == router(model._inner.layers[-1])
        assert router(block_again) == router(block) and kinds(again.head) == kinds(model.head)
    hidden, logits = model.forward(mx.array([PROMPT]))
    hidden2, logits2 = again.forward(mx.array([PROMPT]))
    np.testing.assert_array_equal(np.array(logits), np.array(logits2))
    g = model.mtp_forward(hidden[:, :-1], mx.array([PROMPT[1:]]))[1]
    np.testing.assert_array_equal(np.array(g), np.array(again.mtp_forward(hidden2[:, :-1], mx.array([PROMPT[1:]]))[1]))
    plain = model.generate(PROMPT, depth=0, max_tokens=24).tokens
    assert all(again.generate(PROMPT, depth=d, max_tokens=24).tokens == plain for d in (0, 1, 3))


@pytest.mark.parametrize("family, key, declared, stored", [
    ("qwen3_5_moe", "mtp_num_hidden_layers", 1, 2), ("qwen3_next", "num_nextn_predict_layers", 2, 1),
    ("deepseek_v3", "num_nextn_predict_layers", 1, 2), ("mimo", "num_nextn_predict_layers", 2, 1)])
def test_mtp_layers_the_config_does_not_declare_are_refused_not_dropped(hf_checkpoints, tmp_path, family, key,
                                                                        declared, stored):
    import json
    import shutil

    path = tmp_path / "several"
    shutil.copytree(hf_checkpoints(family, experts="dense" if family == "mimo" else "per_expert", mtp_layers=stored),
                    path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: declared}))
    with pytest.raises(mtpnb.MTPNBError, match=f"the checkpoint has MTP layers \\{list(range(stored))}, the config "
                                               f"declares {declared}") as e:
        mtpnb.load(path)
    assert "\n" not in str(e.value)


def test_verify_kernel_switch_on_moe_leaves_routed_experts_stock_and_says_so(hf_checkpoints):
    """The switch covers the dense parts (attention, Gated DeltaNet, shared expert, router); the routed
    experts stay on gather_qmm, and info() says both (mtpnb info and the bench report print it)."""
    from mtpnb.kernels import VerifyQuantizedLinear, coverage

    model = load(hf_checkpoints("qwen3_5_moe", experts="fused", head="echo"), quantize=4, group_size=32)
    assert model.info()["verify_kernels"].startswith("off; ")
    switched = model.use_verify_kernels()
    layers = [m for m in (model.trunk, model.head) for _, m in m.named_modules()]
    assert switched == sum(type(m) is VerifyQuantizedLinear for m in layers) > 0
    assert {type(m).__name__ for m in layers if "SwitchLinear" in type(m).__name__} == {"QuantizedSwitchLinear"}
    shared = model._inner.layers[-1].mlp.shared_expert.gate_proj
    assert type(shared) is VerifyQuantizedLinear and type(model._inner.layers[-1].mlp.gate) is VerifyQuantizedLinear
    experts = coverage(model.trunk)["routed_expert_layers"] + coverage(model.head)["routed_expert_layers"]
    line = model.info()["verify_kernels"]
    assert line.startswith(f"on for {switched} of {switched} quantized linears")
    assert f"the routed experts ({experts} layers" in line and line.endswith("always run MLX's gather_qmm")
    assert experts == 3 * (len(model._inner.layers) + 1)  # gate, up, down per MoE layer, the head's included
    model.use_verify_kernels(False)
