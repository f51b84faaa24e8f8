"""Model families: which mlx-lm module runs a checkpoint's trunk, and how its MTP head is stored.

Each family module names the `model_type`s it reads (MODEL_TYPES: model_type -> mlx-lm module) and
provides:
    sanitize_trunk(weights) -> weights   what the trunk needs before mlx-lm's own sanitize
    head_weights(weights, text_config)   the head's tensors among a checkpoint's, under the head's names
    build_head(text_config)              the head module (MTPHead or a family's own)
    is_head_weight(key, text_config)     whether a checkpoint tensor belongs to the head
    is_hybrid(text_config)               Gated DeltaNet layers (conv1d's shape tells the HF layout)
    normalize_config(text_config)        fill in what mlx-lm's ModelArgs need from transformers' config
"""

from __future__ import annotations

from . import deepseek, mimo, qwen, qwen3_next

FAMILIES = {model_type: family for family in (qwen, qwen3_next, deepseek, mimo) for model_type in family.MODEL_TYPES}
# Later generations whose MTP layers mtpnb does not implement (their trunks differ: sparse attention,
# sliding windows): named in the refusal so a user knows it is the family, not the checkpoint.
NOT_YET = {"mimo_v2_flash": "MiMo-V2-Flash", "deepseek_v32": "DeepSeek-V3.2"}


def family_of(config: dict):
    """The family module of a config (its own model_type, or its text_config's)."""
    for model_type in (config.get("model_type"), config.get("text_config", {}).get("model_type")):
        if model_type in FAMILIES:
            return FAMILIES[model_type], model_type
    return None, None


def mlx_module(config: dict) -> str:
    family, model_type = family_of(config)
    return family.MODEL_TYPES[model_type]
