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
