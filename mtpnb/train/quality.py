"""The quality evaluation of a model folder on the held-out packages (issue 19's definitions).

    python -m mtpnb.train.quality MODEL_DIR [MODEL_DIR ...] --json OUT [--prompts 56] [--depth-prompts 16]
    python -m mtpnb.train.evaluate MODEL_DIR --quality OUT --write    # into evaluation.json and the card

Per model, on the same held-out text and prompts whatever the model (both come from the code's
HELDOUT_PACKAGES, read from this environment; models sharing a tokenizer then see the same tokens):
- held-out perplexity: per token, float32 (torch), over `--ppl-tokens` tokens in windows of 1024, the same
  number of windows from the start of every held-out package (its files in order, each followed by `<|endoftext|>`);
- function-header prompts: in each held-out package, functions with a docstring and a body after it,
  `--prompts` in all, spread evenly over each package's functions; a prompt is up to PROMPT_CONTEXT_LINES
  lines before the `def` (decorators included), the signature and the docstring, up to its line end;
- completions: 128 tokens with mtpnb's engine (MLX, float32) at depth 3, greedy and at T=0.6 / top-p 0.95
  / top-k 20 (seed = prompt index + --seed-offset), decoded from the generated ids with the model's tokenizer
  (`decode(prompt_ids + ids)` minus the decoded prompt);
- loop rate: share of completions in which some 8-token span (of generated ids) occurs 3 or more times;
- parse rate: share whose first function body parses with `ast`: the signature + docstring + completion,
  cut at the first non-blank line that dedents to the `def` (or further), else with the last partial line
  dropped, dedented;
- tokens per verify and acceptance per draft position (P(accepted | reached), pooled): depth 3 over all
  completions and over the non-looping ones; depths 1, 2, 4 over the first `--depth-prompts` prompts;
- five uncurated completions: the first five prompts, greedy, depth 3.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from ..metrics import loops
from .corpus import EOS_TOKEN, HELDOUT_PACKAGES, installed_source

PROMPT_CONTEXT_LINES = 12
MAX_NEW_TOKENS = 128
SAMPLINGS = {"greedy": {"temperature": 0.0}, "T=0.6": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}}


def function_prompts(count: int = 56, packages=HELDOUT_PACKAGES) -> list[dict]:
    """[{"name", "prompt", "header", "indent"}]: `count` function-header prompts, spread over the packages
    (count // len(packages) each, the remainder to the first ones), each package's functions spread evenly."""
    per_package = [count // len(packages) + (i < count % len(packages)) for i in range(len(packages))]
    prompts = []
    for package, wanted in zip(packages, per_package):
        candidates = []
        for f in installed_source(package).files:
            lines = f.text.splitlines(keepends=True)
            for fn in ast.walk(ast.parse(f.text)):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(fn.body) < 2:
                    continue
                doc = fn.body[0]
                if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                    continue
                first = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
                header = "".join(lines[fn.lineno - 1 : doc.end_lineno])
                if len(header) > 1500 or not header.endswith("\n"):
                    continue
                context = "".join(lines[max(0, first - PROMPT_CONTEXT_LINES) : fn.lineno - 1])
                candidates.append({
                    "name": f"{f.path}:{fn.name}",
                    "prompt": context + header,
                    "header": header,
                    "indent": fn.col_offset,
                })
        if candidates and wanted:
            picks = np.linspace(0, len(candidates) - 1, wanted).round().astype(int)
            prompts += [candidates[i] for i in dict.fromkeys(picks.tolist())]
    return prompts[:count]


def first_body(header: str, indent: int, completion: str, finished: bool) -> str:
    """The function as written: header + completion up to the first line that dedents to the `def`;
    without such a line, the last partial line is dropped (unless the model ended the text itself)."""
    lines = completion.splitlines(keepends=True)
    kept = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        kept.append(line)
    else:
        if kept and not finished and not kept[-1].endswith("\n"):
            kept.pop()
    return header + "".join(kept)


def parses(source: str) -> bool:
    try:
        ast.parse(textwrap.dedent(source))
    except (SyntaxError, ValueError):
        return False
    return True


def heldout_perplexity(model_dir: Path, max_tokens: int, seq_len: int = 1024) -> dict:
    import torch

    from .evaluate import heldout_metrics, windows
    from .export import load_model
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    model = load_model(model_dir)
    depth = model_depth(model_dir)
    # the same number of windows from every package; cut for the deepest head, then trimmed to this
    # model's depth: every model is scored on the same targets
    per_package = max(1, math.ceil(max_tokens / seq_len / len(HELDOUT_PACKAGES)))
    rows = []
    for package in HELDOUT_PACKAGES:
        ids: list[int] = []
        for f in installed_source(package).files:
            ids += [*tokenizer.encode(f.text).ids, eos]
            if len(ids) >= per_package * (seq_len + 5):
                break
        rows.append(windows(np.asarray(ids, dtype=np.int64), seq_len, 4)[:per_package, : seq_len + depth + 1])
    rows = torch.cat(rows)
    torch.manual_seed(0)
    metrics = heldout_metrics(model, rows, depth, 4, torch.autocast("cpu", enabled=False))
    return {k: metrics[k] for k in ("tokens", "loss_main", "perplexity", "agree", "chain", "tokens_per_verify_estimate")}


def model_depth(model_dir: Path) -> int:
    training = Path(model_dir) / "training.json"
    return json.loads(training.read_text())["hyperparameters"]["depth"] if training.exists() else 3


def _pooled(results: list, depth: int) -> dict:
    from mtpnb.metrics import acceptance_counts

    reached, accepted = [0] * depth, [0] * depth
    for r in results:
        rc, ac = acceptance_counts(r.steps, depth)
        reached = [a + b for a, b in zip(reached, rc)]
        accepted = [a + b for a, b in zip(accepted, ac)]
    verifies = sum(r.metrics.verify_calls for r in results)
    emitted = sum(r.metrics.mean_tokens_per_verify * r.metrics.verify_calls for r in results)
    return {
        "completions": len(results),
        "tokens_per_verify": emitted / verifies if verifies else None,
        "acceptance_by_position": [a / n if n else None for a, n in zip(accepted, reached)],
    }


def quality(model_dir: Path, prompts: list[dict], depth_prompts: int = 16, ppl_tokens: int = 28672,
            samplings=tuple(SAMPLINGS), seed_offset: int = 0) -> dict:
    """The measurements of the module docstring for one model; ppl_tokens=0 leaves the perplexity out,
    `samplings` picks among SAMPLINGS (the parts can run in separate processes and be merged); prompt i is
    sampled with seed seed_offset + i (another offset: another sample of the same sampled rates)."""
    import mtpnb

    from .tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    out = {"model": str(model_dir), "prompts": len(prompts)}
    if ppl_tokens:
        out["heldout"] = heldout_perplexity(model_dir, ppl_tokens)
        print(f"{model_dir}: perplexity {out['heldout']['perplexity']:.2f}", flush=True)
    model = mtpnb.load(model_dir)
    tokenizer = load_tokenizer(model_dir)
    for label in samplings:
        sampling = SAMPLINGS[label]
        rows, results = [], []
        for i, p in enumerate(prompts):
            prompt_ids = tokenizer.encode(p["prompt"]).ids
            r = model.generate(prompt_ids, depth=3, max_tokens=MAX_NEW_TOKENS, seed=seed_offset + i, **sampling)
            prefix = tokenizer.decode(prompt_ids)
            text = tokenizer.decode(prompt_ids + list(r.tokens))[len(prefix):]
            finished = r.metrics.finish_reason == "stop"
            looped = loops(list(r.tokens))
            rows.append({"name": p["name"], "text": text, "loops": looped,
                         "parses": parses(first_body(p["header"], p["indent"], text, finished)),
                         "tokens": len(r.tokens), "finish_reason": r.metrics.finish_reason})
            results.append(r)
        n = len(rows)
        by_depth = {3: _pooled(results, 3)}
        by_depth[3]["non_looping"] = _pooled([r for r, row in zip(results, rows) if not row["loops"]], 3)
        for d in (1, 2, 4):
            runs = [model.generate(tokenizer.encode(p["prompt"]).ids, depth=d, max_tokens=MAX_NEW_TOKENS,
                                   seed=seed_offset + i, **sampling) for i, p in enumerate(prompts[:depth_prompts])]
            by_depth[d] = _pooled(runs, d)
        out[label] = {
            "sampling": sampling,
            "loop_rate": sum(r["loops"] for r in rows) / n,
            "parse_rate": sum(r["parses"] for r in rows) / n,
            "depths": {d: by_depth[d] for d in sorted(by_depth)},
            "completions": rows,
        }
        print(f"{model_dir} {label}: loop {out[label]['loop_rate']:.0%} parse {out[label]['parse_rate']:.0%} "
              f"tokens/verify@3 {by_depth[3]['tokens_per_verify']:.2f} (non-looping "
              f"{by_depth[3]['non_looping']['tokens_per_verify'] or math.nan:.2f})", flush=True)
    if "greedy" in out:
        out["examples"] = [{"name": p["name"], "prompt": p["prompt"], "completion": r["text"]}
                           for p, r in zip(prompts[:5], out["greedy"]["completions"][:5])]
    return out


def main(argv=None) -> None:
    import mtpnb  # noqa: F401  (loads OpenBLAS in place of MLX's reference BLAS before MLX)

    parser = argparse.ArgumentParser(prog="python -m mtpnb.train.quality", description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, required=True, help="results file: entries are added per model label")
    parser.add_argument("--label", action="append", help="a label per model (default: the folder name)")
    parser.add_argument("--prompts", type=int, default=56)
    parser.add_argument("--depth-prompts", type=int, default=16, help="prompts for depths 1, 2 and 4")
    parser.add_argument("--ppl-tokens", type=int, default=28672, help="0: no perplexity")
    parser.add_argument("--samplings", nargs="+", choices=list(SAMPLINGS), default=list(SAMPLINGS))
    parser.add_argument("--seed-offset", type=int, default=0, help="prompt i is sampled with seed OFFSET + i")
    args = parser.parse_args(argv)
    prompts = function_prompts(args.prompts)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    labels = args.label or [m.resolve().name for m in args.models]
    for label, model_dir in zip(labels, args.models):
        results.setdefault(label, {}).update(
            quality(model_dir, prompts, args.depth_prompts, args.ppl_tokens, tuple(args.samplings), args.seed_offset))
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
