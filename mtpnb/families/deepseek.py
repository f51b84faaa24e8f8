"""DeepSeek-V3 / R1 (MLA attention) and GLM-4.5 / 4.6 (GQA attention): each MTP layer is an extra decoder
layer after the trunk's last, `model.layers.{num_hidden_layers + k}` for k < `num_nextn_predict_layers`,
read as vLLM's deepseek_mtp.py and glm4_moe_mtp.py read it (draft step j runs layer j % n):

    enorm, hnorm          plain RMSNorms (x_hat * w) of the embedding and of the trunk's state
    eh_proj               Linear 2H -> H over cat[enorm(embed(x[t+1])), hnorm(H[t])]  (embedding first)
    the decoder layer     input_layernorm, self_attn, post_attention_layernorm, mlp (a sparse MoE)
    shared_head.norm      the RMSNorm before the output head
    shared_head.head, embed_tokens   copies of the trunk's lm_head and embedding: the trunk's are used

mlx-lm's own decoder layer of the family runs the layer (MLA keeps its compressed latent in a
KVCache, so the head's cache trims like any other). Its sanitize brings the layer's weights to its
layout (experts stacked, MLA's kv_b_proj split into embed_q / unembed_out).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import replace
from types import SimpleNamespace

from ..errors import MTPNBError
from ..head import NextNHead, NextNLayer
from .common import check_layer_indices, mtp_layer_count

MODEL_TYPES = {"deepseek_v3": "deepseek_v3", "glm4_moe": "glm4_moe"}
DECODER_LAYERS = {"deepseek_v3": "DeepseekV3DecoderLayer", "glm4_moe": "DecoderLayer"}
SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # the trunk's embedding and lm_head serve


def is_hybrid(text_config: dict) -> bool:
    return False


def normalize_config(text_config: dict) -> None:
    """transformers 5 writes rope settings in `rope_parameters`; mlx-lm's ModelArgs wants them flat."""
    rope = text_config.get("rope_parameters") or {}
    text_config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    text_config.setdefault("rope_scaling", rope if rope.get("rope_type", "default") != "default" else None)
    if text_config.get("model_type") == "glm4_moe":
        text_config.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    mtp_layers(text_config)


def mtp_layers(text_config: dict) -> int:
    return mtp_layer_count(text_config, "num_nextn_predict_layers")


def sanitize_trunk(weights: dict) -> dict:
    return weights


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_head_weight(key: str, text_config: dict) -> bool:
    """The published layout (a layer past the trunk's), or `mtp.*` as mtpnb.save writes any head
    (already in the head's names)."""
    m = _LAYER.match(key)
    return key.startswith("mtp.") or (m is not None and int(m[1]) >= text_config["num_hidden_layers"])


def _args(text_config: dict):
    module = importlib.import_module(f"mlx_lm.models.{MODEL_TYPES[text_config['model_type']]}")
    return module, module.ModelArgs.from_dict(text_config)


def head_weights(weights: dict, text_config: dict, shift_norms: bool) -> dict:
    """`model.layers.{N + k}.*` -> the head's `layers.{k}.*`; the decoder layers' part (`block`)
    through mlx-lm's sanitize (as a k-layer model: the same code that reads the trunk's layers)."""
    if all(k.startswith("mtp.") for k in weights):  # mtpnb.save's MLX layout
        return {k.removeprefix("mtp."): v for k, v in weights.items()}
    if any(k.startswith("mtp.") for k in weights):
        raise MTPNBError("the checkpoint holds MTP layers both as model.layers.* and as mtp.*")
    first, count = text_config["num_hidden_layers"], mtp_layers(text_config)
    own, blocks, found = {}, {}, set()
    for key, value in weights.items():
        index, name = _LAYER.match(key).groups()
        k = int(index) - first
        found.add(k)
        if name in SHARED_COPIES:
            continue
        if re.match(r"(enorm|hnorm|eh_proj|shared_head)\.", name):
            own[f"layers.{k}.{name}"] = value
        else:
            blocks[f"model.layers.{k}.{name}"] = value
    check_layer_indices(found, count, f"model.layers.{first}...")
    module, args = _args(text_config)
    as_model = SimpleNamespace(args=replace(args, num_hidden_layers=count))
    blocks = module.Model.sanitize(as_model, blocks)
    own.update({re.sub(r"^model\.layers\.(\d+)\.", r"layers.\1.block.", k): v for k, v in blocks.items()})
    return own


def build_head(text_config: dict) -> NextNHead:
    module, args = _args(text_config)
    block = getattr(module, DECODER_LAYERS[text_config["model_type"]])
    first = args.num_hidden_layers
    return NextNHead([NextNLayer(args.hidden_size, args.rms_norm_eps, block(args, layer_idx=first + k))
                      for k in range(mtp_layers(text_config))])
