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

import re
from collections import defaultdict

import mlx.core as mx

from ..errors import MTPNBError
from . import deepseek, mimo, qwen, qwen3_next

FAMILIES = {model_type: family for family in (qwen, qwen3_next, deepseek, mimo) for model_type in family.MODEL_TYPES}


def family_of(config: dict):
    """The family module of a config (its own model_type, or its text_config's)."""
    for model_type in (config.get("model_type"), config.get("text_config", {}).get("model_type")):
        if model_type in FAMILIES:
            return FAMILIES[model_type], model_type
    return None, None


def mlx_module(config: dict) -> str:
    family, model_type = family_of(config)
    return family.MODEL_TYPES[model_type]


_PER_EXPERT = re.compile(r"^(.+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")


def stack_experts(weights: dict) -> dict:
    """Routed experts in either published form -> mlx-lm's SwitchGLU (`switch_mlp.{gate,up,down}_proj`):
    per expert (`experts.{e}.gate_proj.weight`, as transformers' save_pretrained writes them) or fused
    3-D without a `.weight` suffix (`experts.gate_up_proj` [E, 2I, H] with rows [gate; up],
    `experts.down_proj` [E, H, I], as the published BF16 Qwen3.5/3.6 MoE checkpoints hold them)."""
    out, groups = {}, defaultdict(dict)
    for key, value in weights.items():
        if m := _PER_EXPERT.match(key):
            groups[(m[1], m[3], m[4])][int(m[2])] = value
        elif key.endswith(".experts.gate_up_proj"):
            mlp, mid = key.removesuffix(".experts.gate_up_proj"), value.shape[-2] // 2
            out[f"{mlp}.switch_mlp.gate_proj.weight"] = value[..., :mid, :]
            out[f"{mlp}.switch_mlp.up_proj.weight"] = value[..., mid:, :]
        elif key.endswith(".experts.down_proj"):
            out[f"{key.removesuffix('.experts.down_proj')}.switch_mlp.down_proj.weight"] = value
        else:
            out[key] = value
    for (mlp, proj, part), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise MTPNBError(f"{mlp}.experts has experts {sorted(experts)} for {proj}: some are missing")
        out[f"{mlp}.switch_mlp.{proj}.{part}"] = mx.stack([experts[e] for e in range(len(experts))])
    return out
