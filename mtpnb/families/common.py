"""Helpers the family modules share."""

from __future__ import annotations

import re
from collections import defaultdict

import mlx.core as mx

from ..errors import MTPNBError


def mtp_layer_count(text_config: dict, *keys: str) -> int:
    """How many MTP layers a config declares under any of `keys` (1 when it declares none)."""
    declared = {key: text_config[key] for key in keys if text_config.get(key) is not None}
    counts = set(declared.values())
    if len(counts) > 1:
        raise MTPNBError(f"the config's MTP layer counts disagree: {declared}")
    count = counts.pop() if counts else 1
    if not isinstance(count, int) or count < 0:
        raise MTPNBError(f"{' / '.join(declared)} must be a count of MTP layers, not {count!r}")
    return max(count, 1)  # 0 (declared by some trunks without a head): a checkpoint's head is still read


def check_layer_indices(found, count: int, where: str) -> None:
    """The checkpoint holds exactly the MTP layers the config declares: none dropped, none missing."""
    if sorted(found) != list(range(count)):
        raise MTPNBError(f"{where}: the checkpoint has MTP layers {sorted(found)}, the config declares {count}")


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
