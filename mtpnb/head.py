"""The MTP heads on MLX: Qwen3.5 / Qwen3.6 / Qwen3-Next (MTPHead), DeepSeek-V3 / GLM-4.5 (NextNHead)
and MiMo (MiMoHead).

Qwen:

    e = pre_fc_norm_embedding(embed(x[t+1]));  h = pre_fc_norm_hidden(H[t])
    z = layer(fc([e, h]));  g = norm(z);  logits = lm_head(g)

H is the trunk's output after its final norm. Step j > 1 feeds the previous step's `g` back as
the hidden state (as vLLM does), with the embedding of the previous draft. The layer is one
gated full-attention decoder layer of the Qwen3.5 family, reused from mlx-lm (its MLP a sparse
MoE when the config has experts), with its own KV cache.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5
from mlx_lm.models.base import create_attention_mask

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


class MTPHead(nn.Module):
    def __init__(self, args: qwen3_5.TextModelArgs):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        # The layer index only selects the full-attention variant of the decoder layer.
        self.layers = [qwen3_5.DecoderLayer(args, layer_idx=args.full_attention_interval - 1)]
        self.norm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache=None) -> mx.array:
        """hidden, embeddings: [B, T, H] -> g: [B, T, H] (post-norm, feeds lm_head and the next step)."""
        z = self.fc(
            mx.concatenate(
                [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
            )
        )
        mask = create_attention_mask(z, cache)
        z = self.layers[0](z, mask=mask, cache=cache)
        return self.norm(z)

    def pre_logits(self, g: mx.array) -> mx.array:
        """What lm_head reads: g itself (already normed)."""
        return g


class NextNHead(nn.Module):
    """The MTP layer of DeepSeek-V3 and GLM-4.5 (their papers' "MTP module"; vLLM's deepseek_mtp.py):

        z = layer(eh_proj(cat[enorm(embed(x[t+1])), hnorm(H[t])]))     # norms plain: x_hat * w
        logits = lm_head(shared_head.norm(z))

    H is the trunk's output after its final norm; step j > 1 feeds the previous step's z, *before*
    shared_head.norm (as vLLM does). The layer is mlx-lm's decoder layer of the family, its own
    KV cache (MLA's compressed latent for DeepSeek). vLLM zeroes the embedding at position 0 of the
    head's input; that row only informs later drafts (never the output), and it is kept here."""

    def __init__(self, hidden: int, eps: float, layer: nn.Module):
        super().__init__()
        self.enorm = nn.RMSNorm(hidden, eps=eps)
        self.hnorm = nn.RMSNorm(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = [layer]
        self.shared_head = SharedHead(hidden, eps)

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache=None) -> mx.array:
        """hidden, embeddings: [B, T, H] -> z: [B, T, H] (pre-norm: feeds the next step)."""
        z = self.eh_proj(mx.concatenate([self.enorm(embeddings), self.hnorm(hidden)], axis=-1))
        mask = create_attention_mask(z, cache, return_array=True)
        return self.layers[0](z, mask, cache)

    def pre_logits(self, z: mx.array) -> mx.array:
        return self.shared_head.norm(z)


class MiMoHead(nn.Module):
    """The MTP layer of Xiaomi MiMo (vLLM's mimo_mtp.py):

        g = final_layernorm(layer(input_proj(cat[hidden_layernorm(H[t]), token_layernorm(embed(x[t+1]))])))
        logits = lm_head(g)                                   # norms plain: x_hat * w; hidden first

    g feeds the next step, as the Qwen heads' does (vLLM runs MiMo's head one step deep only). The
    layer is mlx-lm's MiMo (Qwen2-shaped) transformer block."""

    def __init__(self, hidden: int, eps: float, layer: nn.Module):
        super().__init__()
        self.token_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.hidden_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.input_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = [layer]
        self.final_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, hidden: mx.array, embeddings: mx.array, cache=None) -> mx.array:
        z = self.input_proj(mx.concatenate([self.hidden_layernorm(hidden), self.token_layernorm(embeddings)], axis=-1))
        mask = create_attention_mask(z, cache)
        return self.final_layernorm(self.layers[0](z, mask, cache))

    def pre_logits(self, g: mx.array) -> mx.array:
        return g


class SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
