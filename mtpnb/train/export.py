"""Write and read the Hugging Face layout folder: config.json, model.safetensors (with `mtp.*`),
tokenizer files, the corpus manifest.

Checkpoint names are the trunk's own (`model.*`; `lm_head.weight` left out since it is tied to
`model.embed_tokens.weight`) plus the head's 15 `mtp.*` tensors at the top level. `A_log` stays float32
whatever the export dtype (eight decay rates per layer, that mlx-lm also never down-casts).

`python -m mtpnb.train.export SRC DST` joins a sharded export (the device returns files of < 16 MiB)
into one model.safetensors and copies the other files; with `--base BASE --weight W` the weights are
BASE + W * (SRC - BASE), part of the way from the weights a fine-tune started from to where it ended.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5TextConfig

from .model import MTPModel

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "manifest.json")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def checkpoint_state(model: MTPModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The exported tensors, by checkpoint name."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "trunk.lm_head.weight" and model.config.tie_word_embeddings:
            continue
        name = name.removeprefix("trunk.")
        keep_fp32 = name.endswith("A_log")
        state[name] = tensor.detach().to("cpu", torch.float32 if keep_fp32 else dtype).contiguous()
    return state


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int | None = None) -> None:
    """One model.safetensors, or HF-style shards plus model.safetensors.index.json."""
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(out_dir / WEIGHTS), metadata=metadata)
        return
    shards = _shards(state, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def export(
    model: MTPModel,
    out_dir: Path,
    tokenizer_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json, the weights and the tokenizer/manifest files of `tokenizer_dir` to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.dtype = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(config.to_json_string(use_diff=False))
    save_weights(checkpoint_state(model, dtype), out_dir, max_shard_bytes)
    for name in SIDE_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS).exists():
        return load_file(str(model_dir / WEIGHTS))
    index = json.loads((model_dir / INDEX).read_text())
    state = {}
    for filename in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(model_dir / filename)))
    return state


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> MTPModel:
    """The torch model of an exported folder (sharded or not), in `dtype`, in eval mode."""
    config = Qwen3_5TextConfig.from_pretrained(str(model_dir))
    model = MTPModel(config)
    state = {("" if name.startswith("mtp.") else "trunk.") + name: t for name, t in read_weights(model_dir).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"trunk.lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise ValueError(f"{model_dir}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return model.to(dtype).eval()


def merge_shards(src: Path, dst: Path) -> None:
    """Copy an exported folder, joining its weight shards into one model.safetensors."""
    src, dst = Path(src), Path(dst)
    _copy_folder(src, dst, read_weights(src))


def _copy_folder(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> None:
    """`state` as one model.safetensors in dst, beside copies of src's other files."""
    dst.mkdir(parents=True, exist_ok=True)
    save_weights(state, dst)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith("model") and path.name != INDEX:
            shutil.copyfile(path, dst / path.name)


def interpolate(src: Path, base: Path, dst: Path, weight: float) -> None:
    """Copy the fine-tuned folder `src` as merge_shards does, its weights BASE + weight * (SRC - BASE) (in
    float32, stored in src's dtypes), where `base` is the folder it was fine-tuned from: a fine-tune's whole
    step can overshoot, and part of it can keep most of what each end does well (WiSE-FT, Wortsman et al.
    2022). training.json records the weight; the card and its Reproduce section say so."""
    src, base, dst = Path(src), Path(base), Path(dst)
    if not 0 < weight <= 1:
        raise SystemExit(f"--weight {weight}: give the share of the fine-tune's change to keep, in (0, 1]")
    training = json.loads((src / "training.json").read_text())
    if training.get("base") != json.loads((base / "training.json").read_text()):
        raise SystemExit(f"{src} was not fine-tuned from {base} (its training.json's `base` is not {base}'s "
                         "training.json): give the folder its --init-from named")
    start, end = read_weights(base), read_weights(src)
    if start.keys() != end.keys() or any(start[n].shape != t.shape for n, t in end.items()):
        raise SystemExit(f"{src} and {base} hold different tensors: not a fine-tune of it")
    _copy_folder(src, dst, {n: (start[n].float() + weight * (t.float() - start[n].float())).to(t.dtype)
                            for n, t in end.items()})
    training["interpolation"] = {"weight": weight}
    (dst / "training.json").write_text(json.dumps(training, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mtpnb.train.export",
        description="Copy an exported folder, joining its weight shards into one model.safetensors; with --base "
                    "and --weight, its weights part of the way from those it was fine-tuned from.")
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--base", type=Path, help="the folder SRC was fine-tuned from (its --init-from)")
    parser.add_argument("--weight", type=float, help="with --base: the share of the fine-tune's change to keep")
    args = parser.parse_args(argv)
    if (args.base is None) != (args.weight is None):
        parser.error("--base and --weight go together")
    if args.base is None:
        merge_shards(args.src, args.dst)
    else:
        interpolate(args.src, args.base, args.dst, args.weight)


if __name__ == "__main__":
    main()
