"""Evaluate a trained model folder on its held-out text (the manifest's held-out files).

    python -m mtpnb.train.evaluate MODEL_DIR [--max-tokens N] [--engine] [--quality JSON] [--shapes JSON] [--write]

- trunk next-token cross-entropy and perplexity on the held-out text;
- per MTP step k = 1..D: cross-entropy against the real next tokens, top-1 agreement with the trunk's
  own greedy choice at the same position ("agree"), and the chance that steps 1..k all agree ("chain").
  Teacher-forced on the real text, so `1 + sum(chain)` is an offline estimate of greedy tokens per
  verify step;
- greedy completions of a few obvious prompts;
- with `--engine`, the engine's own acceptance on held-out prompts (greedy and sampled) and its decode
  speed per depth (`engine_metrics`, `acceptance_table`).

`--quality` and `--shapes` take the results of `mtpnb.train.quality` (held-out perplexity, loop and parse
rates, acceptance per depth, beside the previous model) and `mtpnb.train.shapes` (the shape choice).
`--write` stores evaluation.json in MODEL_DIR and renders the model card again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .card import write_card
from .corpus import EOS_TOKEN
from .export import load_model
from .model import MTPModel
from .tokenizer import load_tokenizer

PROMPTS = ("def fibonacci(n):", "import os\n", "class LRUCache:\n")
SAMPLING = ({"temperature": 0.0}, {"temperature": 0.6, "top_p": 0.95, "top_k": 20})


def windows(tokens: np.ndarray, seq_len: int, depth: int) -> torch.Tensor:
    """Non-overlapping rows of seq_len + depth + 1 tokens (the tail that does not fill a row is left out)."""
    width = seq_len + depth + 1
    rows = len(tokens) // width
    return torch.from_numpy(tokens[: rows * width].astype(np.int64)).view(rows, width)


@torch.no_grad()
def heldout_metrics(
    model: MTPModel, rows: torch.Tensor, depth: int, batch_size: int, autocast: torch.autocast
) -> dict:
    """Trunk and head metrics over `rows` [N, L + depth + 1] (see the module docstring)."""
    device = next(model.parameters()).device
    seq_len = rows.shape[1] - depth - 1
    nll_main = torch.zeros((), device=device, dtype=torch.float64)
    nll_mtp = torch.zeros(depth, device=device, dtype=torch.float64)
    agree = torch.zeros(depth, device=device, dtype=torch.float64)
    chain = torch.zeros(depth, device=device, dtype=torch.float64)
    for batch in rows.split(batch_size):
        batch = batch.to(device)
        with autocast:
            hidden, logits = model.trunk_forward(batch[:, : seq_len + depth])
            head_logits = model.mtp_steps(hidden[:, :seq_len], batch, depth)
        greedy = logits.argmax(-1)  # the trunk's choice for the token after each position
        nll_main += F.cross_entropy(logits[:, :seq_len].flatten(0, 1).float(), batch[:, 1 : seq_len + 1].flatten(), reduction="sum")
        all_agree = torch.ones_like(greedy[:, :seq_len], dtype=torch.bool)
        for k, step_logits in enumerate(head_logits, start=1):
            target = batch[:, k + 1 : k + 1 + seq_len]
            nll_mtp[k - 1] += F.cross_entropy(step_logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
            hit = step_logits.argmax(-1) == greedy[:, k : k + seq_len]
            all_agree &= hit
            agree[k - 1] += hit.sum()
            chain[k - 1] += all_agree.sum()
    n = rows.shape[0] * seq_len
    loss_main = (nll_main / n).item()
    return {
        "tokens": n,
        "loss_main": loss_main,
        "perplexity": math.exp(loss_main),
        "loss_mtp": (nll_mtp / n).tolist(),
        "agree": (agree / n).tolist(),
        "chain": (chain / n).tolist(),
        "tokens_per_verify_estimate": 1.0 + (chain / n).sum().item(),
    }


@torch.no_grad()
def greedy_complete(model: MTPModel, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation with the trunk alone (full recompute per token: short prompts only)."""
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    eos = tokenizer.token_to_id(EOS_TOKEN)
    for _ in range(max_new_tokens):
        _, logits = model.trunk_forward(ids)
        nxt = logits[0, -1].argmax().item()
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(ids[0].tolist())


def heldout_texts(model_dir: Path) -> tuple[list[str], int]:
    """The held-out files named in the folder's manifest, read from this interpreter's stdlib and this
    environment's packages, and how many of them match the manifest's sha256 (another Python version or
    another package version differs)."""
    from .corpus import installed_source

    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    installed = {}
    for name in manifest.get("heldout_packages", []):
        try:
            installed.update({f.path: f.text for f in installed_source(name).files})
        except Exception:  # noqa: BLE001  (a package missing here: its files are skipped, the count says so)
            continue
    texts, matching = [], 0
    for entry in manifest["heldout"]:
        if entry["path"] in installed:
            text = installed[entry["path"]]
        elif (root / entry["path"]).exists():
            text = (root / entry["path"]).read_text(encoding="utf-8")
        else:
            continue
        matching += hashlib.sha256(text.encode()).hexdigest() == entry["sha256"]
        texts.append(text)
    return texts, matching


def heldout_prompts(model_dir: Path, count: int = 8, prompt_chars: int = 600) -> list[str]:
    """Prompts for the engine's acceptance measurement: the opening of each of the first `count`
    held-out modules (tests excluded), cut at a line end."""
    texts, _ = heldout_texts(model_dir)
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    modules = [t for t, e in zip(texts, manifest["heldout"]) if not e["path"].startswith("test/")]
    return [t[: t.rfind("\n", 0, prompt_chars) + 1] for t in modules[:count]]


def acceptance_table(
    generate: Callable[..., object], prompts: Sequence[str], depth: int = 3, max_tokens: int = 128
) -> list[dict]:
    """The engine's acceptance on held-out prompts, per sampling setting in SAMPLING.

    `generate(prompt, depth=..., max_tokens=..., **sampling)` returns an `mtpnb.events.Metrics` (the
    engine wires it). Per setting: mean tokens per verify step (over all verify calls) and the acceptance
    per draft position (drafts accepted / drafts that reached that position, pooled over prompts).
    """
    table = []
    for sampling in SAMPLING:
        runs = [generate(p, depth=depth, max_tokens=max_tokens, **sampling) for p in prompts]
        emitted = sum(m.mean_tokens_per_verify * m.verify_calls for m in runs)
        verifies = sum(m.verify_calls for m in runs)
        by_position = [
            float(np.mean([m.acceptance_by_position[i] for m in runs if len(m.acceptance_by_position) > i]))
            for i in range(depth)
        ]
        table.append(
            {
                **sampling,
                "depth": depth,
                "mean_tokens_per_verify": emitted / max(verifies, 1),
                "acceptance_by_position": by_position,
            }
        )
    return table


def engine_metrics(model_dir: Path, depth: int, max_tokens: int = 128) -> dict:
    """The same folder through mtpnb's MLX engine: `acceptance_table` on held-out prompts, and the
    decode speed of PROMPTS[0] at every depth from 0 to `depth`, in one process."""
    import mlx.core as mx

    import mtpnb

    model = mtpnb.load(model_dir)

    def generate(prompt: str, **params):
        return model.generate(prompt, seed=0, **params).metrics

    acceptance = acceptance_table(generate, heldout_prompts(model_dir), depth, max_tokens)
    generate(PROMPTS[0], depth=depth, max_tokens=16)  # warm-up
    speed = []
    for d in range(depth + 1):
        m = generate(PROMPTS[0], depth=d, max_tokens=max_tokens)
        speed.append(
            {
                "depth": d,
                "decode_tok_s": m.decode_tok_s,
                "end_to_end_tok_s": m.end_to_end_tok_s,
                "mean_tokens_per_verify": m.mean_tokens_per_verify,
            }
        )
    return {"device": str(mx.default_device()), "max_tokens": max_tokens, "acceptance": acceptance, "decode_speed": speed}


def evaluate(model_dir: Path, max_tokens: int | None = None, seq_len: int = 1024, batch_size: int = 8) -> dict:
    model_dir = Path(model_dir)
    depth = json.loads((model_dir / "training.json").read_text())["hyperparameters"]["depth"]
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    texts, matching = heldout_texts(model_dir)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ids = [i for enc in tokenizer.encode_batch(texts) for i in (*enc.ids, eos)]
    tokens = np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int64)
    rows = windows(tokens, seq_len, depth)
    metrics = heldout_metrics(model, rows, depth, batch_size, torch.autocast("cpu", enabled=False))
    return {
        "python": platform.python_version(),
        "heldout_files": len(texts),
        "heldout_files_matching_manifest": matching,
        "seq_len": seq_len,
        **metrics,
        "completions": {p: greedy_complete(model, tokenizer, p) for p in PROMPTS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtpnb.train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--max-tokens", type=int, help="evaluate on the first N held-out tokens only")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--engine", action="store_true", help="also measure acceptance and speed with the MLX engine")
    parser.add_argument("--quality", type=Path, metavar="JSON",
                        help="results of `python -m mtpnb.train.quality` (this model and the previous one) to include")
    parser.add_argument("--shapes", type=Path, metavar="JSON", help="results of `python -m mtpnb.train.shapes` to include")
    parser.add_argument("--write", action="store_true", help="write evaluation.json and re-render README.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = evaluate(args.model_dir, args.max_tokens, args.seq_len)
    for key in ("quality", "shapes"):
        if getattr(args, key) is not None:
            results[key] = json.loads(getattr(args, key).read_text())
    if args.engine:
        depth = json.loads((args.model_dir / "training.json").read_text())["hyperparameters"]["depth"]
        results["engine"] = engine_metrics(args.model_dir, depth)
    print(json.dumps({k: v for k, v in results.items() if k not in ("completions", "quality", "shapes")}, indent=1))
    for prompt, text in results["completions"].items():
        print(f"--- {prompt!r}\n{text}")
    if args.write:
        (args.model_dir / "evaluation.json").write_text(json.dumps(results, indent=1) + "\n")
        write_card(args.model_dir)


if __name__ == "__main__":
    main()
