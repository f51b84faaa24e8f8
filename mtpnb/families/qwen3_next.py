"""Qwen3-Next: a hybrid Gated DeltaNet / gated-attention MoE trunk (mlx-lm's qwen3_next) whose MTP head
has the Qwen3.5 layout (`mtp.fc`, `mtp.pre_fc_norm_{embedding,hidden}`, `mtp.layers.0` a gated
full-attention layer with a sparse-MoE MLP, `mtp.norm`; every norm stored as w for x_hat * (1 + w)),
read as vLLM's qwen3_next_mtp.py reads it.

mlx-lm's qwen3_next sanitize stacks the trunk's per-expert weights and shifts its norms itself.
"""

from __future__ import annotations

from . import qwen
from .common import mtp_layer_count

MODEL_TYPES = {"qwen3_next": "qwen3_next"}


def is_hybrid(text_config: dict) -> bool:
    return True  # Gated DeltaNet layers: conv1d's shape tells the Hugging Face layout


def normalize_config(text_config: dict) -> None:
    """transformers 5 writes rope settings in `rope_parameters`; mlx-lm's ModelArgs wants them flat."""
    rope = text_config.get("rope_parameters") or {}
    text_config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    text_config.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
    text_config.setdefault("decoder_sparse_step", 1)
    text_config.setdefault("mlp_only_layers", [])
    mtp_layers(text_config)


def mtp_layers(text_config: dict) -> int:
    """vLLM's qwen3_next_mtp.py reads the count as `num_nextn_predict_layers`; the published config
    names it `mtp_num_hidden_layers` as Qwen3.5's does. Either, and they must agree."""
    return mtp_layer_count(text_config, "num_nextn_predict_layers", *qwen.LAYER_COUNT_KEYS)


def sanitize_trunk(weights: dict) -> dict:
    return weights


is_head_weight = qwen.is_head_weight


def head_weights(weights: dict, text_config: dict, shift_norms: bool) -> dict:
    return qwen.head_weights(weights, {**text_config, "mtp_num_hidden_layers": mtp_layers(text_config)}, shift_norms)


def build_head(text_config: dict):
    return qwen.build_head({**text_config, "mtp_num_hidden_layers": mtp_layers(text_config)})
