"""The MTP heads on MLX: Qwen3.5 / Qwen3.6 / Qwen3-Next (MTPHead), DeepSeek-V3 / GLM-4.5 (NextNHead)
and MiMo (MiMoHead).

Qwen:

    e = pre_fc_norm_embedding(embed(x[t+1]));  h = pre_fc_norm_hidden(H[t])
    z = layers[k](fc([e, h]));  g = norm(z);  logits = lm_head(g)

H is the trunk's output after its final norm. Step j > 1 feeds the previous step's `g` back as
the hidden state (as vLLM does), with the embedding of the previous draft. The layer is one
gated full-attention decoder layer of the Qwen3.5 family, reused from mlx-lm (its MLP a sparse
MoE when the config has experts), with its own KV cache.

Several MTP layers (a config's `mtp_num_hidden_layers` / `num_nextn_predict_layers` > 1) are used as
vLLM uses them: draft step j (0-based) runs layer k = j % n (`spec_step_idx % num_mtp_layers` in
vLLM's qwen3_next_mtp.py and deepseek_mtp.py). For Qwen the layers share fc, the pre-fc norms and the
final norm; for DeepSeek/GLM and MiMo each layer is a whole MTP module with its own norms and
projection. Each layer keeps its own KV cache (HeadCache): the committed positions enter every
layer's cache (each attends over the whole committed context, as vLLM's attention reads every
position), and a draft step's row enters only the cache of the layer that ran it, right after that
layer's previous rows (vLLM numbers draft step j's row n + j in every layer; with one layer the two
agree, with several a layer's first draft row here follows the committed positions directly).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from . import cpu_kernels

# The seven RMSNorms of a dense head. Hugging Face checkpoints store them as w, applied as
# x_hat * (1 + w); MLX's RMSNorm applies x_hat * w, so these get +1 when loaded from that layout.
MTP_NORM_SUFFIXES = (
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
    "mtp.norm.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)


def head_args(text_config: dict) -> qwen3_5.TextModelArgs:
    """Arguments of the head's decoder layer from the trunk's (text) config.

    Qwen3.5 trunks give them directly. An all-attention trunk (qwen3, llama) carrying the same
    head format gets a Qwen3.5 layer shaped like its own attention, rotary over the whole head
    unless the config says otherwise."""
    cfg = dict(text_config)
    if not cfg.get("model_type", "").startswith("qwen3_5"):
        rope = dict(cfg.get("rope_parameters") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        rope.setdefault("type", "default")
        cfg["rope_parameters"] = rope
        cfg.pop("rope_scaling", None)
    return qwen3_5.TextModelArgs.from_dict(cfg)  # num_experts > 0: the layer's MLP is a sparse MoE


class HeadCache:
    """The head's KV caches, one per MTP layer. A head call at step 0 (the committed positions) adds
    its rows to every layer's cache; a call at draft step j >= 1 adds its row to layer j % n's only.
    `trim(m)` takes back the rows of draft steps 1..m of the current round, from the layers that ran
    them (with one layer: the last m rows, as a KVCache trims)."""

    def __init__(self, layers: int):
        self.caches = [KVCache() for _ in range(layers)]

    def trim(self, m: int) -> int:
        n = len(self.caches)
        for k, cache in enumerate(self.caches):
            cache.trim(sum(1 for j in range(1, m + 1) if j % n == k))
        return m

    @property
    def offset(self) -> int:
        """Positions in layer 0's cache (the committed ones, then its own draft rows)."""
        return self.caches[0].offset

    @property
    def state(self) -> list:
        return [c.state for c in self.caches]


def run_layers(layers: list, step: int, cache: HeadCache | None, inputs, run):
    """Which layers a head call runs, and their output: `run(k, x, cache)` for layer k on `inputs(k)`.
    Uncached: layer step % n (a whole sequence through the layer of that step). Cached, step 0: every
    layer (each fills its cache with the committed rows), layer 0's output returned. Cached, step j:
    layer j % n on its own cache."""
    n = len(layers)
    if cache is None:
        return run(step % n, inputs(step % n), None)
    if step:
        return run(step % n, inputs(step % n), cache.caches[step % n])
    outs = [run(k, inputs(k), cache.caches[k]) for k in range(n)]
    return outs[0]


class MTPHead(nn.Module):
    def __init__(self, args: qwen3_5.TextModelArgs, layers: int = 1):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        # The layer index only selects the full-attention variant of the decoder layer.
        self.layers = [qwen3_5.DecoderLayer(args, layer_idx=args.full_attention_interval - 1) for _ in range(layers)]
        self.norm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache: HeadCache | None = None,
                 step: int = 0) -> mx.array:
        """hidden, embeddings: [B, T, H] -> g: [B, T, H] (post-norm, feeds lm_head and the next step)."""
        z = self.fc(
            mx.concatenate(
                [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
            )
        )

        def run(k, x, layer_cache):
            return self.layers[k](x, mask=create_attention_mask(x, layer_cache), cache=layer_cache)

        return self.norm(run_layers(self.layers, step, cache, lambda k: z, run))

    def pre_logits(self, g: mx.array, step: int = 0) -> mx.array:
        """What lm_head reads: g itself (already normed)."""
        return g

    def draft_steps_kernel(self, embed: mx.array, draft_rows: mx.array,
                           draft_vocab: mx.array | None) -> cpu_kernels.HeadDraftSteps | None:
        """The C kernel for this head's draft steps, given the embedding matrix and the output rows
        it drafts from (their token ids `draft_vocab`, None: all); None where it does
        not apply: not one dense layer, the CPU kernels not installed on it (quantized, another device,
        turned off), or a RoPE other than the plain one."""
        if len(self.layers) != 1:
            return None
        layer = self.layers[0]
        attention, mlp = layer.self_attn, layer.mlp
        linears = [self.fc, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                   *(getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))]
        norms = [self.pre_fc_norm_embedding, self.pre_fc_norm_hidden, layer.input_layernorm, attention.q_norm,
                 attention.k_norm, layer.post_attention_layernorm, self.norm]
        rope = attention.rope
        if (not all(type(m) is cpu_kernels.SmallBatchLinear and "bias" not in m for m in linears)
                or not all(type(n) is nn.RMSNorm for n in norms) or type(rope) is not nn.RoPE
                or rope.traditional or rope.scale != 1.0
                or any(a.dtype != mx.float32 for a in (embed, draft_rows))):
            return None
        weights = [embed, self.pre_fc_norm_embedding.weight, self.pre_fc_norm_hidden.weight, self.fc.weight,
                   layer.input_layernorm.weight, attention.q_proj.weight, attention.k_proj.weight,
                   attention.v_proj.weight, attention.q_norm.weight, attention.k_norm.weight,
                   attention.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_proj.weight,
                   mlp.up_proj.weight, mlp.down_proj.weight, self.norm.weight, draft_rows]
        dims = (self.fc.weight.shape[0], attention.num_attention_heads, attention.num_key_value_heads,
                attention.head_dim, rope.dims, mlp.gate_proj.weight.shape[0], draft_rows.shape[0])
        return cpu_kernels.HeadDraftSteps(weights, draft_vocab, dims, self.norm.eps, rope.base)


class NextNLayer(nn.Module):
    """One MTP module of DeepSeek-V3 / GLM-4.5 (`model.layers.{N + k}`): its norms, projection, the
    decoder layer (`block`) and shared_head.norm."""

    def __init__(self, hidden: int, eps: float, block: nn.Module):
        super().__init__()
        self.enorm = nn.RMSNorm(hidden, eps=eps)
        self.hnorm = nn.RMSNorm(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.shared_head = SharedHead(hidden, eps)


class NextNHead(nn.Module):
    """The MTP modules of DeepSeek-V3 and GLM-4.5 (their papers' "MTP module"; vLLM's deepseek_mtp.py):

        z = block(eh_proj(cat[enorm(embed(x[t+1])), hnorm(H[t])]))     # norms plain: x_hat * w
        logits = lm_head(shared_head.norm(z))

    H is the trunk's output after its final norm; step j > 1 feeds the previous step's z, *before*
    shared_head.norm (as vLLM does). The block is mlx-lm's decoder layer of the family, its own
    KV cache (MLA's compressed latent for DeepSeek). vLLM zeroes the embedding at position 0 of the
    head's input; that row only informs later drafts (never the output), and it is kept here."""

    def __init__(self, layers: list[NextNLayer]):
        super().__init__()
        self.layers = layers

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache: HeadCache | None = None,
                 step: int = 0) -> mx.array:
        """hidden, embeddings: [B, T, H] -> z: [B, T, H] (pre-norm: feeds the next step)."""

        def inputs(k):
            m = self.layers[k]
            return m.eh_proj(mx.concatenate([m.enorm(embeddings), m.hnorm(hidden)], axis=-1))

        def run(k, z, layer_cache):
            return self.layers[k].block(z, create_attention_mask(z, layer_cache, return_array=True), layer_cache)

        return run_layers(self.layers, step, cache, inputs, run)

    def pre_logits(self, z: mx.array, step: int = 0) -> mx.array:
        return self.layers[step % len(self.layers)].shared_head.norm(z)


class MiMoLayer(nn.Module):
    """One MTP layer of MiMo (`model.mtp_layers.{k}`): its norms, input projection, the Qwen2-shaped
    decoder layer (`block`) and final_layernorm."""

    def __init__(self, hidden: int, eps: float, block: nn.Module):
        super().__init__()
        self.token_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.hidden_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.input_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.final_layernorm = nn.RMSNorm(hidden, eps=eps)


class MiMoHead(nn.Module):
    """The MTP layers of Xiaomi MiMo (vLLM's mimo_mtp.py):

        g = final_layernorm(block(input_proj(cat[hidden_layernorm(H[t]), token_layernorm(embed(x[t+1]))])))
        logits = lm_head(g)                                   # norms plain: x_hat * w; hidden first

    g feeds the next step, as the Qwen heads' does. The block is mlx-lm's MiMo (Qwen2-shaped)
    transformer block."""

    def __init__(self, layers: list[MiMoLayer]):
        super().__init__()
        self.layers = layers

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache: HeadCache | None = None,
                 step: int = 0) -> mx.array:
        def inputs(k):
            m = self.layers[k]
            return m.input_proj(mx.concatenate([m.hidden_layernorm(hidden), m.token_layernorm(embeddings)], axis=-1))

        def run(k, z, layer_cache):
            m = self.layers[k]
            return m.final_layernorm(m.block(z, create_attention_mask(z, layer_cache), layer_cache))

        return run_layers(self.layers, step, cache, inputs, run)

    def pre_logits(self, g: mx.array, step: int = 0) -> mx.array:
        return g


class SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
