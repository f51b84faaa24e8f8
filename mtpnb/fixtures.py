"""Random checkpoints in the formats mtpnb loads, written the way their real producers write them,
with no download: small ones for tests, demos and the notebook that shows how loading works, and a
stand-in shaped like the default model for benchmarking the machinery.

    path = make_checkpoint("/tmp/tiny", family="qwen3_5", layout="hf", mtp="inline")
    path = make_standin("/tmp/standin")       # the default model's config, random weights
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import MTPNBError
from .head import MTP_NORM_SUFFIXES, MTPHead, head_args

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# Norms the Hugging Face Qwen3.5 layout stores as w with 1 + w applied (the trunk's).
TRUNK_SHIFTED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                       ".q_norm.weight", ".k_norm.weight")


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with no merges: 3 special tokens, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + 256, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([], trainer=trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }, indent=2))


def tiny_config(family: str = "qwen3_5", *, vocab_size: int = 259, hidden_size: int = 64, num_layers: int = 4,
                tie: bool = True, mtp: bool = True) -> dict:
    common = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "intermediate_size": 2 * hidden_size, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie, "max_position_embeddings": 4096,
        "eos_token_id": 0, "torch_dtype": "float32",
    }
    if mtp:
        common.update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)
    if family == "qwen3_5":
        return {
            **common, "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"],
            "layer_types": ["full_attention" if (i + 1) % 2 == 0 else "linear_attention" for i in range(num_layers)],
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
            "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        }
    if family in ("qwen3", "llama"):
        arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[family]
        return {**common, "model_type": family, "architectures": [arch], "rope_theta": 10000.0}
    raise ValueError(f"unknown family {family!r}")


def make_checkpoint(path, *, family: str = "qwen3_5", layout: str = "hf", mtp: str | None = "inline",
                    head: str = "random", seed: int = 0, logit_scale: float = 1.0, **config_options) -> Path:
    """Write a random model folder.

    family: qwen3_5 (hybrid Gated DeltaNet trunk), qwen3 or llama (all attention).
    layout: "hf" (Hugging Face: conv1d [C,1,K], norms stored as w for 1 + w) or "mlx" (mtpnb.save).
    mtp: "inline" (in model.safetensors), "sidecar" (mtp.safetensors), or None (no head).
    head: "random" (a poor draft head), or "echo": fc passes the hidden state through and the
        layer adds nothing, so g is proportional to the trunk's own last hidden state and the head
        re-predicts the token the trunk just chose. Greedy drafts are then right exactly while the
        output repeats itself: on a random trunk's repetitive text every acceptance count occurs.
    logit_scale: multiplies the embeddings, to make the distributions sharper (> 1) or flatter.
    Returns the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, mtp=mtp is not None, **config_options)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_byte_tokenizer(path)
    weights, head_weights = _random_weights(path, config, head=head if mtp is not None else None, seed=seed,
                                            logit_scale=logit_scale)
    if layout == "hf":
        weights = _to_hf_layout(weights, family)
        head_weights = {k: v - 1.0 if k.endswith(MTP_NORM_SUFFIXES) else v for k, v in head_weights.items()}
    elif layout == "mlx":
        config["mtp_norms_shifted"] = True
        (path / "config.json").write_text(json.dumps(config, indent=2))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if mtp == "sidecar":
        mx.save_safetensors(str(path / "mtp.safetensors"), head_weights)
    else:
        weights.update(head_weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def make_standin(path, head: str = "echo", seed: int = 0) -> Path:
    """A random checkpoint shaped like the default model (its config.json; a BPE tokenizer of the same
    size trained on a slice of the standard library outside the held-out modules), in the MLX layout,
    for benchmarking the machinery without the trained weights. head="echo" drafts the trunk's own last
    token (some acceptance on the repetitive text of a random trunk); "random" accepts almost nothing.
    Its speedups mean nothing. An existing stand-in at `path` is reused."""
    from .loading import DEFAULT_MODEL_DIR
    from .train.corpus import HELDOUT_MODULES
    from .train.tokenizer import save_tokenizer, train_tokenizer

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    config.update(mtp_norms_shifted=True, dtype="float32", torch_dtype="float32")  # random float32 weights
    (path / "config.json").write_text(json.dumps(config, indent=2))
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for f in sorted(root.glob("*.py")):
        if f.stem in HELDOUT_MODULES:
            continue
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        size += len(texts[-1])
        if size > 4_000_000:
            break
    if not texts:
        raise MTPNBError(f"no standard-library source in {root} to train the stand-in's tokenizer on")
    save_tokenizer(train_tokenizer(texts, config["vocab_size"]), path, config["max_position_embeddings"])
    weights, head_weights = _random_weights(path, config, head=head, seed=seed)
    weights.update(head_weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def _random_weights(path: Path, config: dict, *, head: str | None, seed: int,
                    logit_scale: float = 1.0) -> tuple[dict, dict]:
    """Random trunk weights for the config at `path` (mlx-lm's names) and, unless head is None, the
    MTP head's ("random" or "echo", see make_checkpoint), named mtp.*."""
    from .loading import _model_classes, read_config  # the loader's own classes: same module tree

    mx.random.seed(seed)
    trunk_class, args_class = _model_classes(read_config(path))
    trunk = trunk_class(args_class.from_dict(read_config(path)))
    weights = _randomized(dict(tree_flatten(trunk.parameters())), logit_scale)
    head_weights = {}
    if head is not None:
        head_weights = dict(tree_flatten(MTPHead(head_args(config)).parameters()))
        head_weights = _echo(head_weights) if head == "echo" else _randomized(head_weights, 1.0)
        head_weights = {f"mtp.{k}": v for k, v in head_weights.items()}
    return weights, head_weights


def _randomized(weights: dict, logit_scale: float) -> dict:
    """Norm weights around 1 (not exactly 1, so a missing or doubled shift shows), embeddings scaled."""
    out = {}
    for k, v in weights.items():
        if k.endswith("norm.weight") and v.ndim == 1:
            v = 1.0 + 0.2 * mx.random.normal(v.shape)
        elif k.endswith("embed_tokens.weight"):
            v = v * logit_scale
        out[k] = v
    mx.eval(out)
    return out


def _echo(weights: dict) -> dict:
    out = dict(weights)
    hidden = out["fc.weight"].shape[0]
    out["fc.weight"] = mx.concatenate([mx.zeros((hidden, hidden)), mx.eye(hidden)], axis=1)
    for k in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        out[k] = mx.zeros_like(out[k])
    for k in out:
        if k.endswith("norm.weight"):
            out[k] = mx.ones_like(out[k])
    return out


def _to_hf_layout(weights: dict, family: str) -> dict:
    """mlx-lm parameter names and conventions -> what transformers' save_pretrained writes."""
    if family != "qwen3_5":
        return weights  # qwen3 / llama: the two layouts are the same
    out = {}
    for k, v in weights.items():
        k = k.removeprefix("language_model.")
        if "conv1d.weight" in k:
            v = v.moveaxis(2, 1)  # [C, K, 1] -> [C, 1, K]
        elif k.endswith(TRUNK_SHIFTED_NORMS) and v.ndim == 1:
            v = v - 1.0
        out[k] = v
    return out


# -- checkpoints written by transformers' own classes (needs torch + transformers) ---------------

HF_FAMILIES = ("qwen3_5_moe", "qwen3_next", "deepseek_v3", "glm4_moe", "mimo")
# transformers has no MiMo class (MiMo ships remote code): its trunk is Qwen2's, written by Qwen2ForCausalLM
# under MiMo's model_type.
CONFIG_AS = {"mimo": {"model_type": "mimo", "architectures": ["MiMoForCausalLM"]}}


def hf_tiny_config(family: str, *, vocab_size: int = 259, tie: bool = False, mtp_layers: int = 1):
    """A tiny transformers config of `family` with its `mtp_layers` MTP layers declared, float32."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  max_position_embeddings=4096, eos_token_id=0, pad_token_id=0, bos_token_id=None,
                  initializer_range=0.02)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    hybrid = dict(  # Qwen3.5 MoE and Qwen3-Next: Gated DeltaNet / gated attention, a shared expert
        shared_expert_intermediate_size=48, layer_types=["linear_attention", "full_attention"] * 2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    if family == "qwen3_5_moe":
        config = transformers.Qwen3_5MoeTextConfig(
            **common, **moe, **hybrid, mtp_num_hidden_layers=mtp_layers, mtp_use_dedicated_embeddings=False)
        config.architectures = ["Qwen3_5MoeForCausalLM"]
    elif family == "qwen3_next":
        config = transformers.Qwen3NextConfig(**common, **moe, **hybrid, norm_topk_prob=True)
        config.num_nextn_predict_layers = mtp_layers  # Qwen3-Next's name for the count of MTP layers
        config.architectures = ["Qwen3NextForCausalLM"]
    elif family == "deepseek_v3":
        common.update(num_hidden_layers=3, num_key_value_heads=4)
        del common["head_dim"]
        config = transformers.DeepseekV3Config(
            **common, **moe, intermediate_size=96, n_shared_experts=1, n_routed_experts=4, n_group=2, topk_group=1,
            routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=mtp_layers,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        config.architectures = ["DeepseekV3ForCausalLM"]
    elif family == "glm4_moe":
        common.update(num_hidden_layers=3)
        config = transformers.Glm4MoeConfig(
            **common, **moe, intermediate_size=96, n_shared_experts=1, n_routed_experts=4, n_group=1, topk_group=1,
            routed_scaling_factor=1.0, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
            num_nextn_predict_layers=mtp_layers,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )
        config.architectures = ["Glm4MoeForCausalLM"]
    elif family == "mimo":
        common.update(num_hidden_layers=3, intermediate_size=96)
        config = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        config.num_nextn_predict_layers = mtp_layers
    else:
        raise ValueError(f"unknown family {family!r}; transformers-written checkpoints exist for {HF_FAMILIES}")
    config._attn_implementation = "sdpa"
    return config


def hf_classes(family: str):
    """transformers' (causal LM class, decoder layer class, index of the MTP layer's kind of layer) of a
    family: a full-attention layer for the Qwen families, the layer after the trunk for DeepSeek/GLM."""
    if family == "qwen3_5_moe":
        from transformers import Qwen3_5MoeForCausalLM
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer

        return Qwen3_5MoeForCausalLM, Qwen3_5MoeDecoderLayer, 1
    if family == "qwen3_next":
        from transformers import Qwen3NextForCausalLM
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer

        return Qwen3NextForCausalLM, Qwen3NextDecoderLayer, 1
    if family == "deepseek_v3":
        from transformers import DeepseekV3ForCausalLM
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

        return DeepseekV3ForCausalLM, DeepseekV3DecoderLayer, 3  # the MTP layer follows the 3 trunk layers
    if family == "glm4_moe":
        from transformers import Glm4MoeForCausalLM
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

        return Glm4MoeForCausalLM, Glm4MoeDecoderLayer, 3
    if family == "mimo":
        from transformers import Qwen2ForCausalLM
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        return Qwen2ForCausalLM, Qwen2DecoderLayer, 0  # mtp_layers.0
    raise ValueError(f"unknown family {family!r}")


def make_hf_checkpoint(path, *, family: str = "qwen3_5_moe", experts: str = "per_expert", head: str = "random",
                       seed: int = 0, vocab_size: int = 259, tie: bool | None = None,
                       logit_scale: float = 1.0, mtp_layers: int = 1) -> Path:
    """Write a random float32 checkpoint with transformers' own classes (`save_pretrained`), plus the MTP
    layer's tensors in the family's published layout, and mtpnb's byte tokenizer.

    family: one of HF_FAMILIES.
    experts: "per_expert" (what transformers' save_pretrained writes: `experts.{e}.gate_proj.weight`...)
        or "fused" (trunk and head experts as the published BF16 checkpoints hold them:
        `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).
    head: "random", or "echo" (the MTP layer passes the hidden state through, so the head re-predicts
        the trunk's last token: drafts are right exactly while the output repeats itself).
    tie: tied embeddings (by default only with the echo head: a random trunk with tied embeddings
        tends to repeat tokens; with logit_scale ~0.1 not always, so every acceptance count occurs).
    logit_scale: multiplies the embeddings.
    mtp_layers: how many MTP layers (each random, or each an echo), declared in the config as the family does.
    Norm weights are spread around their neutral value so a wrong convention shows.
    """
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if head not in ("random", "echo"):
        raise ValueError(f"unknown head {head!r}")
    tie = head == "echo" if tie is None else tie
    nextn = family in ("deepseek_v3", "glm4_moe", "mimo")  # mlx-lm's classes always have an lm_head: tie by copy
    config = hf_tiny_config(family, vocab_size=vocab_size, tie=tie and not nextn, mtp_layers=mtp_layers)
    causal_lm, decoder_layer, attention_layer = hf_classes(family)
    model = causal_lm(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
        model.get_input_embeddings().weight.mul_(logit_scale)
        if tie and nextn:
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    model.save_pretrained(path)

    layer = decoder_layer(config, layer_idx=attention_layer)
    mtp = {}
    for k in range(mtp_layers):
        layer_weights = {name: torch.randn_like(v) * (0.2 if name.endswith("norm.weight") else 0.1)
                         for name, v in layer.state_dict().items()}
        if family == "mimo":
            mtp.update(_mimo_head(config, layer_weights, head, prefix=f"model.mtp_layers.{k}."))
        elif nextn:
            mtp.update(_nextn_head(config, layer_weights, model, head, prefix=f"model.layers.{attention_layer + k}."))
        else:
            mtp.update(_qwen_head(config, layer_weights, head, prefix="mtp.", index=k))
    weights = load_file(path / "model.safetensors")
    weights.update({k: v.contiguous() for k, v in mtp.items()})
    weights = fuse_experts(weights) if experts == "fused" else split_experts(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    if family in CONFIG_AS:
        written = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**written, **CONFIG_AS[family]}, indent=2))
    write_byte_tokenizer(path)
    return path


def _qwen_head(config, layer_weights: dict, head: str, prefix: str, index: int = 0) -> dict:
    """`mtp.*`: fc, the three norms stored as w for x_hat * (1 + w), and decoder layer `index`
    (fc and the norms are shared by the layers: the last call's are kept)."""
    import torch

    hidden = config.hidden_size
    mtp = {f"layers.{index}.{k}": v for k, v in layer_weights.items()}
    mtp.update({"fc.weight": torch.randn(hidden, 2 * hidden) * 0.1, "norm.weight": torch.randn(hidden) * 0.2,
                "pre_fc_norm_embedding.weight": torch.randn(hidden) * 0.2,
                "pre_fc_norm_hidden.weight": torch.randn(hidden) * 0.2})
    if head == "echo":  # fc passes the hidden state through, the layer adds nothing, norms scale by 1
        mtp["fc.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
        for k in mtp:
            if k.endswith(("o_proj.weight", "experts.down_proj", "shared_expert.down_proj.weight", "norm.weight")):
                mtp[k] = torch.zeros_like(mtp[k])
    return {prefix + k: v for k, v in mtp.items()}


def _nextn_head(config, layer_weights: dict, model, head: str, prefix: str) -> dict:
    """`model.layers.{N}.*`: enorm, hnorm, eh_proj, shared_head.{norm, head}, embed_tokens (copies of
    the trunk's, as published) and the decoder layer; plain norms (x_hat * w)."""
    import torch

    hidden = config.hidden_size
    mtp = {k: (1.0 + v if k.endswith("norm.weight") else v) for k, v in layer_weights.items()}
    mtp.update({"eh_proj.weight": torch.randn(hidden, 2 * hidden) * 0.1,
                "enorm.weight": 1.0 + torch.randn(hidden) * 0.2, "hnorm.weight": 1.0 + torch.randn(hidden) * 0.2,
                "shared_head.norm.weight": 1.0 + torch.randn(hidden) * 0.2,
                "shared_head.head.weight": model.lm_head.weight.detach().clone(),
                "embed_tokens.weight": model.get_input_embeddings().weight.detach().clone()})
    if head == "echo":
        mtp["eh_proj.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
        for k in mtp:
            if k.endswith(("o_proj.weight", "experts.down_proj", "shared_experts.down_proj.weight")):
                mtp[k] = torch.zeros_like(mtp[k])
            elif k.endswith("norm.weight"):
                mtp[k] = torch.ones_like(mtp[k])
    return {prefix + k: v for k, v in mtp.items()}


def _mimo_head(config, layer_weights: dict, head: str, prefix: str) -> dict:
    """`model.mtp_layers.0.*`: token_layernorm, hidden_layernorm, input_proj (over cat[hidden, embedding]),
    final_layernorm and the decoder layer's own names; plain norms (x_hat * w)."""
    import torch

    hidden = config.hidden_size
    mtp = {k: (1.0 + v if k.endswith("norm.weight") else v) for k, v in layer_weights.items()}
    mtp.update({"input_proj.weight": torch.randn(hidden, 2 * hidden) * 0.1,
                **{f"{n}.weight": 1.0 + torch.randn(hidden) * 0.2
                   for n in ("token_layernorm", "hidden_layernorm", "final_layernorm")}})
    if head == "echo":
        mtp["input_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
        for k in mtp:
            if k.endswith(("o_proj.weight", "mlp.down_proj.weight")):
                mtp[k] = torch.zeros_like(mtp[k])
            elif k.endswith("norm.weight"):
                mtp[k] = torch.ones_like(mtp[k])
    return {prefix + k: v for k, v in mtp.items()}


def split_experts(weights: dict) -> dict:
    """Fused 3-D experts (torch) -> one tensor per expert and projection, as save_pretrained writes them."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".experts.gate_up_proj"):
            mlp, mid = k.removesuffix(".gate_up_proj"), v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{mlp}.{e}.gate_proj.weight"] = v[e, :mid].contiguous()
                out[f"{mlp}.{e}.up_proj.weight"] = v[e, mid:].contiguous()
        elif k.endswith(".experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k.removesuffix('.down_proj')}.{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def fuse_experts(weights: dict) -> dict:
    """Per-expert tensors (torch) -> fused 3-D `experts.gate_up_proj` / `experts.down_proj` (no `.weight`)."""
    import re

    import torch

    weights = split_experts(weights)
    per_expert = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups, out = {}, {}
    for k, v in weights.items():
        if m := per_expert.match(k):
            groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
        else:
            out[k] = v
    for experts, projs in groups.items():
        stack = {n: torch.stack([e[i] for i in range(len(e))]) for n, e in projs.items()}
        out[f"{experts}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1).contiguous()
        out[f"{experts}.down_proj"] = stack["down_proj"].contiguous()
    return out
