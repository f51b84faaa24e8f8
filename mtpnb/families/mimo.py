"""Xiaomi MiMo: a Qwen2-shaped trunk (mlx-lm's mimo) whose MTP layers are `model.mtp_layers.{i}`, read as
vLLM's mimo_mtp.py reads them:

    token_layernorm, hidden_layernorm   plain RMSNorms (x_hat * w) of the embedding and of the trunk's state
    input_proj                          Linear 2H -> H over cat[hidden, embedding]  (hidden first)
    the decoder layer                   input_layernorm, self_attn (q/k/v with bias), post_attention_layernorm, mlp
    final_layernorm                     its output, which lm_head reads and the next step takes

MiMo-7B-RL ships one (`mtp_layers.0`). With `num_nextn_predict_layers` = n > 1, draft step j runs layer
j % n: vLLM's mimo_mtp.py picks `mtp_layers[j]` (and drafts one step only); past the n-th step the
layers cycle, as vLLM's DeepSeek and Qwen MTP layers do.
"""

from __future__ import annotations

import re

from ..errors import MTPNBError
from ..head import MiMoHead, MiMoLayer
from .common import check_layer_indices, mtp_layer_count

MODEL_TYPES = {"mimo": "mimo"}
PREFIX = "model.mtp_layers."
OWN = ("token_layernorm.", "hidden_layernorm.", "input_proj.", "final_layernorm.")


def is_hybrid(text_config: dict) -> bool:
    return False


def normalize_config(text_config: dict) -> None:
    """transformers 5 writes rope settings in `rope_parameters`; mlx-lm's ModelArgs wants them flat."""
    rope = text_config.get("rope_parameters") or {}
    text_config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    mtp_layers(text_config)


def mtp_layers(text_config: dict) -> int:
    return mtp_layer_count(text_config, "num_nextn_predict_layers")


def sanitize_trunk(weights: dict) -> dict:
    return weights


def is_head_weight(key: str, text_config: dict) -> bool:
    """The published layout, or `mtp.*` as mtpnb.save writes any head (already in the head's names)."""
    return key.startswith((PREFIX, "mtp."))


def head_weights(weights: dict, text_config: dict, shift_norms: bool) -> dict:
    if all(k.startswith("mtp.") for k in weights):  # mtpnb.save's MLX layout
        return {k.removeprefix("mtp."): v for k, v in weights.items()}
    if any(k.startswith("mtp.") for k in weights):
        raise MTPNBError("the checkpoint holds MTP layers both as model.mtp_layers.* and as mtp.*")
    out, found = {}, set()
    for key, value in weights.items():
        index, name = re.match(r"model\.mtp_layers\.(\d+)\.(.+)$", key).groups()
        found.add(int(index))
        if "rotary_emb.inv_freq" in name:
            continue
        out[f"layers.{index}.{name}" if name.startswith(OWN) else f"layers.{index}.block.{name}"] = value
    check_layer_indices(found, mtp_layers(text_config), "model.mtp_layers")
    return out


def build_head(text_config: dict) -> MiMoHead:
    from mlx_lm.models import mimo

    args = mimo.ModelArgs.from_dict(text_config)
    return MiMoHead([MiMoLayer(args.hidden_size, args.rms_norm_eps, mimo.TransformerBlock(args))
                     for _ in range(mtp_layers(text_config))])
