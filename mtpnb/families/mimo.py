"""Xiaomi MiMo: a Qwen2-shaped trunk (mlx-lm's mimo) whose MTP layers are `model.mtp_layers.{i}`, read as
vLLM's mimo_mtp.py reads them:

    token_layernorm, hidden_layernorm   plain RMSNorms (x_hat * w) of the embedding and of the trunk's state
    input_proj                          Linear 2H -> H over cat[hidden, embedding]  (hidden first)
    the decoder layer                   input_layernorm, self_attn (q/k/v with bias), post_attention_layernorm, mlp
    final_layernorm                     its output, which lm_head reads and the next step takes

mtpnb runs one MTP layer (`mtp_layers.0`, as MiMo-7B-RL ships); a checkpoint with more is refused.
"""

from __future__ import annotations

import re

from ..errors import MTPNBError
from ..head import MiMoHead
from .common import refuse_several_layers

MODEL_TYPES = {"mimo": "mimo"}
PREFIX = "model.mtp_layers."
OWN = ("token_layernorm.", "hidden_layernorm.", "input_proj.", "final_layernorm.")


def is_hybrid(text_config: dict) -> bool:
    return False


def normalize_config(text_config: dict) -> None:
    """transformers 5 writes rope settings in `rope_parameters`; mlx-lm's ModelArgs wants them flat."""
    rope = text_config.get("rope_parameters") or {}
    text_config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    refuse_several_layers(text_config, "num_nextn_predict_layers")


def sanitize_trunk(weights: dict) -> dict:
    return weights


def is_head_weight(key: str, text_config: dict) -> bool:
    """The published layout, or `mtp.*` as mtpnb.save writes any head (already in the head's names)."""
    return key.startswith((PREFIX, "mtp."))


def head_weights(weights: dict, text_config: dict, shift_norms: bool) -> dict:
    if all(k.startswith("mtp.") for k in weights):  # mtpnb.save's MLX layout
        return {k.removeprefix("mtp."): v for k, v in weights.items()}
    layers = sorted({int(m[1]) for k in weights if (m := re.match(r"model\.mtp_layers\.(\d+)\.", k))})
    if layers != [0]:
        raise MTPNBError(f"this MiMo checkpoint has MTP layers {layers}: mtpnb runs exactly one (mtp_layers.0)")
    out = {}
    for key, value in weights.items():
        name = key.removeprefix(f"{PREFIX}0.")
        if "rotary_emb.inv_freq" in name:
            continue
        out[name if name.startswith(OWN) else f"layers.0.{name}"] = value
    return out


def build_head(text_config: dict) -> MiMoHead:
    from mlx_lm.models import mimo

    args = mimo.ModelArgs.from_dict(text_config)
    return MiMoHead(args.hidden_size, args.rms_norm_eps, mimo.TransformerBlock(args))
