"""Qwen3.5 / Qwen3.6 (dense and MoE) trunks, and all-attention trunks (qwen3, llama) carrying the same head.

The head's tensors are `mtp.*` at the top level of the checkpoint (see mtpnb.head); a MoE
checkpoint's head layer has a sparse-MoE MLP (router `mlp.gate`, routed experts, `shared_expert`
and `shared_expert_gate`), its experts per expert or fused 3-D like the trunk's.
"""

from __future__ import annotations

import re

from ..head import MTP_NORM_SUFFIXES, MTPHead, head_args
from .common import check_layer_indices, mtp_layer_count, stack_experts

MODEL_TYPES = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3": "qwen3",
    "llama": "llama",
}
HYBRID_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
LAYER_COUNT_KEYS = ("mtp_num_hidden_layers",)


def is_hybrid(text_config: dict) -> bool:
    """Gated DeltaNet layers (Qwen3.5 and its MoE): conv1d's shape tells the Hugging Face layout."""
    return text_config.get("model_type") in HYBRID_TYPES


def normalize_config(text_config: dict) -> None:
    mtp_layers(text_config)


def mtp_layers(text_config: dict) -> int:
    """`mtp_num_hidden_layers` decoder layers in `mtp.layers.{k}`, draft step j running layer j % n."""
    return mtp_layer_count(text_config, *LAYER_COUNT_KEYS)


def sanitize_trunk(weights: dict) -> dict:
    """mlx-lm's qwen3_5_moe reads fused 3-D experts only; transformers writes them per expert."""
    return stack_experts(weights)


def is_head_weight(key: str, text_config: dict) -> bool:
    return key.startswith("mtp.")


def head_weights(weights: dict, text_config: dict, shift_norms: bool) -> dict:
    """`mtp.*` tensors -> the head's parameter names, norms brought to MLX's x_hat * w."""
    found = {int(m[1]) for k in weights if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    check_layer_indices(found, mtp_layers(text_config), "mtp.layers")
    if shift_norms:
        weights = {k: v + 1.0 if k.endswith(MTP_NORM_SUFFIXES) and v.ndim == 1 else v for k, v in weights.items()}
    return stack_experts({k.removeprefix("mtp."): v for k, v in weights.items()})


def build_head(text_config: dict) -> MTPHead:
    return MTPHead(head_args(text_config), layers=mtp_layers(text_config))
