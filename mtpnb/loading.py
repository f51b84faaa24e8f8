"""Load a model with its MTP head from a folder or a Hugging Face hub repo; save it as an MLX folder.

The trunk is loaded by mlx-lm (its model classes, loader and quantization); this module finds the
`mtp.*` tensors that mlx-lm drops (in the main weight files or a sidecar), builds the head, brings
its norms to MLX's convention and attaches it.

Formats:
- Hugging Face layout (Qwen3.5 as released, or as written by `mtpnb.train`): conv1d [C, 1, K],
  every RMSNorm stored as w and applied as 1 + w, the head's seven norms included.
- MLX layout (mlx-lm conversion, or `mtpnb.save`): already sanitized, maybe quantized; `mtpnb.save`
  marks its head norms as shifted with `"mtp_norms_shifted": true` in config.json.
- An all-attention trunk (qwen3, llama) carrying the same `mtp.*` head.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load_tokenizer, make_shards, quantize_model, save_config

from . import cpu_kernels, rollback
from .blas import warn_once_if_reference_blas
from .errors import MTPNBError
from .families import FAMILIES, NOT_YET, family_of, mlx_module
from .model import Model
from .params import DRAFT_CONTEXT

MTP_SIDECARS = ("mtp.safetensors", "model-mtp.safetensors")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load(
    source: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    quantize: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    quiet: bool = False,
) -> Model:
    """Load a model and its MTP head.

    source: a local folder, a Hugging Face hub repo id ("owner/name", downloaded with
        huggingface_hub), or None for the embedded default model.
    quantize: 4 or 8 to quantize the float weights at load (MLX affine, `group_size`).
    dtype: "float32", "bfloat16" or "float16" for the float weights; by default float32 on the CPU
        (MLX's CPU matmuls are fastest there in float32) and the stored dtype on a GPU.
    The loader's notes are in `model.notes`; a missing head is also a UserWarning, unless `quiet` (front ends
        that show the notes themselves: the mtpnb commands, the magics).
    Prints one line when MLX runs on the slow reference BLAS and something can be done about it
    (mtpnb.blas.warn_once_if_reference_blas).
    """
    warn_once_if_reference_blas()
    if quantize not in (None, 4, 8):
        raise MTPNBError(f"quantize must be 4 or 8 (bits), not {quantize!r}")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise MTPNBError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    path, name = resolve(source, revision)
    config = read_config(path)
    _check_tokenizer_files(path)
    text_config = config.get("text_config", config)
    notes: list[str] = []

    trunk, config = _load_trunk(path, config)
    head_weights, hf_layout = _scan_weights(path, config)
    head = _build_head(head_weights, config, text_config, hf_layout, path) if head_weights else None
    if head is None:
        notes.append(f"no MTP weights in {name}: decoding autoregressively (depth 0)")
        if not quiet:
            warnings.warn(notes[-1], stacklevel=2)

    target = dtype or ("float32" if mx.default_device() == mx.cpu else None)
    if target:
        _cast(trunk, getattr(mx, target))
        if head is not None:
            _cast(head, getattr(mx, target))
    if quantize:
        if "quantization" in config:
            raise MTPNBError(f"{name} is already quantized ({config['quantization']['bits']}-bit); load it without quantize=")
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its bits-per-weight
            trunk, config = quantize_model(trunk, config, group_size=group_size, bits=quantize)
        if head is not None:
            nn.quantize(head, group_size=group_size, bits=quantize,
                        class_predicate=_head_quantization(trunk, config, group_size))
        notes.append(f"quantized at load to {quantize}-bit, group {group_size}")
    mx.eval(trunk.parameters(), head.parameters() if head is not None else [])
    rollback.install(trunk)
    cpu_kernels.install(trunk, head)
    tokenizer = _load_tokenizer(path, config)
    draft_vocab, draft_context = _read_draft_vocab(path, text_config) if head is not None else (None, None)
    model = Model(trunk=trunk, head=head, tokenizer=tokenizer, config=config, path=path, name=name, notes=notes,
                  draft_vocab=draft_vocab, draft_context=DRAFT_CONTEXT if draft_context is None else draft_context)
    if model.draft_vocab is not None:
        context = (f" and up to {model.draft_context} of a generation's own context tokens" if model.draft_context
                   else "")
        notes.append(f"the head drafts from {model.draft_vocab.size} frequent tokens{context} (draft_vocab.json)")
    return model


def resolve(source, revision: str | None = None) -> tuple[Path, str]:
    """A local folder, or a hub repo downloaded into huggingface_hub's cache -> (folder, display name)."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise MTPNBError(f"load() takes a model folder, a hub repo id or None (the default model), not "
                         f"{type(source).__name__}")
    if isinstance(source, str) and not source.strip():
        raise MTPNBError("the model source is empty: give a model folder, a hub repo id, or None for the default "
                         "model")
    if source is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise MTPNBError(
                "the embedded default model is missing from this install: reinstall mtpnb, or pass a model folder"
            )
        return DEFAULT_MODEL_DIR, "mtpnb-default"
    if isinstance(source, str) and source in ("default", "mtpnb-default"):
        return resolve(None)
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), path.name
    if path.exists():
        raise MTPNBError(f"{source} is a file; pass the model folder that holds config.json")
    if isinstance(source, str) and REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        return _download(source, revision), source
    raise MTPNBError(f"no model folder at {source} (and it is not a hub repo id like 'owner/name')")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except RevisionNotFoundError:
        raise MTPNBError(f"hub repo {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:
        raise MTPNBError(f"hub repo {repo_id} is gated: accept its terms and log in (huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise MTPNBError(f"hub repo {repo_id} not found (or private: log in with huggingface-cli login)") from None
    except LocalEntryNotFoundError:
        raise MTPNBError(
            f"cannot reach the Hugging Face hub to download {repo_id} and it is not in the local cache: "
            "connect, or pass a local folder"
        ) from None
    except OSError as e:  # network errors surface as requests/httpx OSErrors
        raise MTPNBError(f"download of {repo_id} failed: {_one_line(e)}") from None


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise MTPNBError(f"{path} has no config.json: is it a model folder?") from None
    except json.JSONDecodeError as e:
        raise MTPNBError(f"{path / 'config.json'} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MTPNBError(f"cannot read {path / 'config.json'}: {_one_line(e)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("text_config", {}), dict):
        raise MTPNBError(f"{path / 'config.json'} is not a model config (a JSON object of settings)")
    model_type = config.get("model_type")
    text_config = config.get("text_config", config)
    if family_of(config)[0] is None:
        if (name := NOT_YET.get(model_type) or NOT_YET.get(text_config.get("model_type"))) is not None:
            raise MTPNBError(f"{name} ({model_type}) is not supported yet; mtpnb runs {', '.join(sorted(FAMILIES))}")
        raise MTPNBError(
            f"model_type {model_type!r} is not supported; mtpnb runs {', '.join(sorted(FAMILIES))}"
        )
    family_of(config)[0].normalize_config(text_config)
    _check_layer_types(config, text_config)
    return config


def _check_layer_types(config: dict, text_config: dict) -> None:
    """mlx-lm's qwen3_5 and qwen3_next read `full_attention_interval` and ignore `layer_types`: derive
    the one from the other, and refuse patterns they cannot express."""
    types = text_config.get("layer_types")
    if not types or not family_of(config)[0].is_hybrid(text_config):
        return
    if "full_attention" not in types:
        raise MTPNBError("layer_types has no full_attention layer; mtpnb needs the Qwen3.5 hybrid pattern")
    interval = types.index("full_attention") + 1
    expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(len(types))]
    if types != expected or interval == 1:
        raise MTPNBError(
            "layer_types is not a 'full attention every N-th layer' pattern with N > 1; "
            "use a qwen3 or llama config for an all-attention trunk"
        )
    text_config["full_attention_interval"] = interval


def _model_classes(config: dict):
    """mlx-lm's classes for the family, with a sanitize that leaves `mtp.*` to us."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{mlx_module(config)}")
    family = family_of(config)[0]
    text_config = config.get("text_config", config)

    class Trunk(module.Model):
        def sanitize(self, weights):
            weights = {k: v for k, v in weights.items() if not family.is_head_weight(k, text_config)}
            weights = family.sanitize_trunk(weights)
            return super().sanitize(weights) if hasattr(super(), "sanitize") else weights

    Trunk.__name__ = Trunk.__qualname__ = module.Model.__name__
    return Trunk, module.ModelArgs


def _load_trunk(path: Path, config: dict):
    from mlx_lm.utils import load_model

    if not glob.glob(str(path / "model*.safetensors")):
        raise MTPNBError(f"{path} has no model*.safetensors weight files")
    try:
        return load_model(path, lazy=True, strict=True, model_config=config, get_model_classes=_model_classes)
    except ValueError as e:  # mlx's load_weights: missing, extra or mis-shaped parameters
        raise MTPNBError(f"weights in {path} do not match its config.json: {_one_line(e)}") from None
    except (RuntimeError, OSError) as e:  # mx.load on a truncated or corrupt file
        raise MTPNBError(f"cannot read the weights in {path}: {_one_line(e)}") from None


def _scan_weights(path: Path, config: dict) -> tuple[dict[str, mx.array], bool]:
    """Every tensor of the MTP head (its family says which) in the main weight files and the known
    sidecar files, and whether the files are in Hugging Face layout (unsanitized conv1d [C, 1, K],
    mlx-lm's own test). mx.load is lazy: only the head's tensors are read."""
    files = sorted(set(glob.glob(str(path / "model*.safetensors"))) | {str(path / s) for s in MTP_SIDECARS})
    family, text_config = family_of(config)[0], config.get("text_config", config)
    weights, hf_layout = {}, False
    for f in files:
        if not os.path.exists(f):
            continue
        try:
            tensors = mx.load(f)
        except (RuntimeError, OSError) as e:
            raise MTPNBError(f"cannot read {f}: {_one_line(e)}") from None
        weights.update({k: v for k, v in tensors.items() if family.is_head_weight(k, text_config)})
        hf_layout |= any("conv1d.weight" in k and v.shape[-1] != 1 for k, v in tensors.items())
    return weights, hf_layout


def _build_head(weights: dict, config: dict, text_config: dict, hf_layout: bool, path: Path) -> nn.Module:
    if text_config.get("mtp_use_dedicated_embeddings"):
        raise MTPNBError("MTP heads with dedicated embeddings are not supported yet")
    family = family_of(config)[0]
    head = family.build_head(text_config)
    weights = family.head_weights(weights, text_config, _head_norms_need_shift(config, text_config, hf_layout))
    quant = config.get("quantization")
    if quant and any(k.endswith(".scales") for k in weights):
        nn.quantize(  # per-layer settings (a MoE router kept at 8 bits) as mtpnb.save recorded them
            head,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights and quant.get(f"mtp.{p}", True),
        )
    try:
        head.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MTPNBError(f"the mtp.* weights in {path} do not match the config: {_one_line(e)}") from None
    head.eval()
    return head


def _head_norms_need_shift(config: dict, text_config: dict, hf_layout: bool) -> bool:
    """True when the head is stored in the Hugging Face (1 + w) convention."""
    if config.get("mtp_norms_shifted") or text_config.get("mtp_norms_shifted"):
        return False
    if "quantization" in config:  # quantized means converted to MLX layout, norms with it
        return False
    if family_of(config)[0].is_hybrid(text_config):
        return hf_layout  # an MLX conversion of a hybrid checkpoint shifts the head with the trunk
    return True


def _read_draft_vocab(path: Path, text_config: dict) -> tuple[list[int] | None, int | None]:
    """mtpnb's optional `draft_vocab.json` ({"ids": [...]}, see mtpnb.train.draft_vocab; optionally
    "context": how many context tokens a generation may add, Model.draft_context) -> (ids, context),
    None for what it does not say."""
    file = path / "draft_vocab.json"
    if not file.exists():
        return None, None
    try:
        saved = json.loads(file.read_text())
        ids, context = saved["ids"], saved.get("context")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise MTPNBError(f'{file} is not a draft vocabulary ({{"ids": [token ids]}}); fix or delete it') from None
    vocab = text_config.get("vocab_size", 0)
    if not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
        raise MTPNBError(f"{file} holds ids outside the vocabulary of {vocab}; fix or delete it")
    if context is not None and not (isinstance(context, int) and not isinstance(context, bool) and context >= 0):
        raise MTPNBError(f'{file}: "context" must be a count of tokens >= 0, got {context!r}; fix or delete it')
    return ids, context


def _cast(module: nn.Module, dtype) -> None:
    module.update(
        tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v,
                 module.parameters())
    )


def _head_quantization(trunk: nn.Module, config: dict, group_size: int):
    """Quantize the head as mlx-lm quantized the trunk (its per-layer rule: a MoE router stays at
    8 bits), recording per-layer settings in config["quantization"] under `mtp.<path>`."""
    rule = getattr(trunk, "quant_predicate", None)

    def predicate(path, module):
        if not (hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0):
            return False
        params = rule(f"mtp.{path}", module) if rule is not None else True
        if isinstance(params, dict):
            config["quantization"][f"mtp.{path}"] = params
        return params

    return predicate


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_tokenizer_files(path: Path) -> None:
    """transformers builds a tokenizer of one token from config.json alone: refuse that folder."""
    if not any((path / name).exists() for name in TOKENIZER_FILES) and not glob.glob(str(path / "*.tiktoken")):
        raise MTPNBError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): copy the "
                         "tokenizer of the model's base into the folder")


def _load_tokenizer(path: Path, config: dict):
    try:
        return load_tokenizer(path, eos_token_ids=config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id")))
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise MTPNBError(f"cannot load the tokenizer in {path}: {_one_line(e)}") from None


def save(model: Model, path: str | os.PathLike) -> Path:
    """Write `model` as an MLX folder (sanitized, quantized if it is, `mtp.*` kept) that
    `mtpnb.load` reads back to the same model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trunk.parameters()))
    if model.head is not None:
        weights.update({f"mtp.{k}": v for k, v in tree_flatten(model.head.parameters())})
    for old in glob.glob(str(path / "model*.safetensors")):
        os.remove(old)
    shards = make_shards(weights)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config = dict(model.config)
    config["mtp_norms_shifted"] = True
    save_config(config, path / "config.json")
    model.tokenizer.save_pretrained(str(path))
    if model.draft_vocab is not None:
        (path / "draft_vocab.json").write_text(json.dumps({"ids": model.draft_vocab.tolist(),
                                                            "context": model.draft_context}))
    return path


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
