"""Helpers the family modules share."""

from __future__ import annotations

import re
from collections import defaultdict

import mlx.core as mx

from ..errors import MTPNBError


def refuse_several_layers(text_config: dict, key: str) -> None:
    """One MTP layer is run (every released checkpoint has one); more would be silently dropped."""
    layers = text_config.get(key, 1)
    if layers not in (0, 1):
        raise MTPNBError(
            f"{key} is {layers}: mtpnb runs one MTP layer, reused for every draft step, so far "
            "(the released checkpoints of this family have 1)"
        )


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
