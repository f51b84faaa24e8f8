"""Benchmarks: MTP depths against plain decoding and mlx-lm, side by side, with a cost model.

    python -m mtpnb.bench [MODEL] [--quick] [--json PATH] [--html PATH]
    mtpnb bench ...  /  %mtp bench ...          (the same code: add_bench_arguments, main, run_bench)

What one run does, in one process on one loaded model:

1. Cost model. With the trunk's caches warm at a realistic context length (a code prompt plus half the
   generation), it times a trunk forward of M tokens, t_verify(M), for M = 1..D+1 (t_1 = t_verify(1) is
   one plain decode step's forward), one draft step as the engine takes it (the head's layer, its logits
   over the draft vocabulary, then argmax at greedy or the processed log-probabilities and a draw when
   sampling: `engine.draft_token`), t_draft, and the acceptance of K drafts with
   its host sync, t_accept(K). Every time is wall time around an `mx.eval` barrier, median of repeats.
   The speedup bound of depth D is  E[tokens per verify] / (t_verify(D+1)/t_1 + D * t_draft/t_1)
   with E[tokens per verify] = 1 + mean accepted drafts per verify, measured in the runs.
2. Runs. For every repeat, prompt and temperature: mlx-lm's `stream_generate` (plain decoding of the same
   trunk, same sampler settings), then mtpnb at depth 0, 1, ..., D, one after another (the order turns
   round every repeat), so that drift on a shared machine touches every configuration alike. Decode tok/s
   = (tokens - 1) / (time of the last token - time of the first), taken by the consumer of the stream for
   both engines; end-to-end tok/s = tokens / whole call, prefill included; TTFT = time to the first token.
   Speedups are paired per repeat (depth d / depth 0 of the same repeat), then the median.
3. Phases. One extra run per configuration with the trunk forward wrapped in an eval barrier splits the
   decode window into: draft (the head's D steps and their drafting ops, to the barrier: StepEvent.draft_s),
   verify forward (the trunk over D+1 tokens, barrier included), acceptance + sync (the acceptance ops on
   the verify's logits and the one transfer of the decision to the host, `engine._to_host`; at depth 0
   the token's choice and `engine._plain_to_host`), rollback
   (building the caches' rollback, `engine._rollback`), detokenization (the streaming detokenizer for
   output tokens and `decode` for rejected drafts, replayed and timed apart) and Python overhead (the
   rest: events, stop checks, bookkeeping, generator hops). The barrier serializes depth 0's pipeline,
   so the phases say where the work goes and the timed runs how fast it goes.

Prompts: the opening of a function in each module the default model holds out of training (the folder's
manifest.json, else mtpnb.train.corpus.HELDOUT_MODULES), read from this interpreter's standard library:
the prompt ends after the `def` line, so the model continues with a function body. A fixed list of small
code prompts stands in where the standard library's source is missing.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import hashlib
import html
import json
import os
import platform as py_platform
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .detokenizer import Detokenizer
from .errors import MTPNBError
from .events import Done, TokenEvent
from .sampling import Sampling, accept_greedy, accept_sampled

SCHEMA = "mtpnb.bench/1"
DESCRIPTION = ("Benchmark MTP depths against plain decoding (depth 0) and mlx-lm on code prompts: decode and "
               "end-to-end tok/s, TTFT, acceptance, the verify-cost curve and the speedup bound; JSON + HTML.")
FULL = {"prompts": 6, "max_tokens": 128, "repeats": 3, "warmup": 1, "cost_repeats": 9}
PARITY_GOAL = 0.97  # mtpnb depth 0 / mlx-lm plain decoding, the issue's floor
MIN_PARITY_PAIRS = 6  # fewer paired runs than this get no verdict (quick mode has 2)
QUICK = {"prompts": 2, "max_tokens": 32, "repeats": 1, "warmup": 1, "cost_repeats": 5}
FALLBACK_HELDOUT = ("bisect", "calendar", "colorsys", "difflib", "fractions", "graphlib", "heapq", "json",
                    "pprint", "shlex", "statistics", "string", "textwrap")
FALLBACK_PROMPTS = (
    ("fallback:fib", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("fallback:lru", "class LRUCache:\n    def __init__(self, capacity):\n"),
    ("fallback:parse", "import re\n\n\ndef parse_args(line):\n    \"\"\"Split a command line into words.\"\"\"\n"),
    ("fallback:merge", "def merge_sorted(a, b):\n"),
)
PHASES = ("draft", "verify_forward", "accept_sync", "rollback", "python", "detokenize")
PHASE_DOC = {
    "draft": "the head's D steps and their drafting ops, to an eval barrier (StepEvent.draft_s)",
    "verify_forward": "the trunk forward over the D+1 verify tokens, to an eval barrier (GDN rollback replays land here)",
    "accept_sync": "acceptance on the verify logits (softmax / processed log-probs, sampling) and the one host sync",
    "rollback": "building the trunk caches' rollback after a partial acceptance (the Gated DeltaNet replay's "
                "graph; its compute lands in the next verify forward)",
    "python": "the rest of the decode window's wall time: graph building outside the timed calls, cache "
              "bookkeeping, events, stop checks, generator hops",
    "detokenize": "the streaming detokenizer for output tokens and decode() of rejected drafts, timed apart",
}
# Okabe-Ito
COLORS = {"blue": "#0072B2", "vermillion": "#D55E00", "orange": "#E69F00", "green": "#009E73",
          "sky": "#56B4E9", "purple": "#CC79A7", "yellow": "#F0E442", "black": "#000000"}
TEMPERATURE_COLORS = (COLORS["blue"], COLORS["vermillion"], COLORS["green"], COLORS["orange"])
PHASE_COLORS = dict(zip(PHASES, (COLORS["orange"], COLORS["blue"], COLORS["vermillion"], COLORS["purple"],
                                 COLORS["sky"], COLORS["green"])))

Progress = Callable[[int, int, str], None]


# -- prompts -----------------------------------------------------------------------------------------
def heldout_modules(model_path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The default model's held-out modules: its manifest.json, else the training corpus's list."""
    if model_path is not None:
        manifest = Path(model_path) / "manifest.json"
        try:
            modules = json.loads(manifest.read_text()).get("heldout_modules")
            if modules:
                return tuple(modules)
        except (OSError, ValueError):
            pass
    try:
        from .train.corpus import HELDOUT_MODULES  # numpy + tokenizers only, no torch

        return tuple(HELDOUT_MODULES)
    except ImportError:
        return FALLBACK_HELDOUT


def code_prompts(count: int = 6, prompt_chars: int = 800, modules: Sequence[str] | None = None,
                 stdlib: str | os.PathLike | None = None) -> list[dict]:
    """Code prompts [{"name", "text"}]: in each module, the first function that starts at least
    `prompt_chars` into the file and whose body spans 8+ lines; the prompt is the `prompt_chars` before the
    body (snapped to a line start), so it ends with the `def` line(s)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    prompts = []
    for module in modules or FALLBACK_HELDOUT:
        if len(prompts) >= count:
            break
        path = next((p for p in (root / f"{module}.py", root / module / "__init__.py") if p.is_file()), None)
        if path is None:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
        starts = [0]
        for line in text.splitlines(keepends=True):
            starts.append(starts[-1] + len(line))
        functions = sorted(
            (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
            key=lambda n: n.lineno,
        )
        lines = text.splitlines(keepends=True)
        for fn in functions:
            if fn.end_lineno - fn.body[0].lineno < 7:
                continue
            header_end = _header_end(lines, fn.lineno - 1, fn.body[0].lineno - 1)
            if header_end is None or starts[header_end + 1] < prompt_chars:
                continue
            body_at = starts[header_end + 1]
            begin = text.rfind("\n", 0, body_at - prompt_chars) + 1
            prompts.append({"name": f"{module}:{fn.name}", "text": text[begin:body_at]})
            break
    for name, text in FALLBACK_PROMPTS:
        if len(prompts) >= count:
            break
        prompts.append({"name": name, "text": text})
    return prompts[:count]


def _header_end(lines: list[str], first: int, body: int) -> int | None:
    """Index of the line that ends a `def` header (its colon, brackets closed), between first and body."""
    depth = 0
    for i in range(first, body + 1):
        code = lines[i].split("#", 1)[0].rstrip()
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if depth == 0 and code.endswith(":"):
            return i
    return None


# -- statistics and the cost model ---------------------------------------------------------------------
def median(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return float(statistics.median(values)) if values else None


def parity(ratios: Sequence[float], goal: float = PARITY_GOAL, level: float = 0.9, resamples: int = 2000) -> dict:
    """mtpnb depth 0 / mlx-lm from paired runs (the same prompt, one right after the other): the median
    ratio, a percentile-bootstrap interval for it (seeded: the same data give the same report) and
    whether the goal is met, missed, or not separable from it at this run's noise. `pairs` keeps the
    ratios in run order (repeats alternate which engine runs first)."""
    in_order = [r for r in ratios if r]
    if not in_order:
        return {}
    ratios = sorted(in_order)
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo = medians[int((1 - level) / 2 * resamples)]
    hi = medians[int((1 + level) / 2 * resamples) - 1]
    mid = statistics.median(ratios)
    interval = f"{mid:.3f}x, {100 * level:.0f}% interval {lo:.3f}-{hi:.3f} over {len(ratios)} paired runs"
    if len(ratios) < MIN_PARITY_PAIRS:
        verdict, text = "undecided", f"too few pairs for a verdict: {interval} (a default run has 18)"
    elif lo >= goal:
        verdict, text = "met", f"at least {goal}x: {interval}"
    elif hi < goal:
        verdict, text = "missed", (f"below {goal}x: {interval}; the phase profile's depth-0 rows show where "
                                   "mtpnb's step spends its time")
    else:
        verdict, text = "undecided", (f"not separable from {goal}x at this run's noise: {interval} "
                                      "(pairs range {:.2f}-{:.2f}); more --repeats or --prompts narrow it".format(
                                          ratios[0], ratios[-1]))
    return {"ratio": mid, "interval": [lo, hi], "level": level, "pairs": in_order, "goal": goal,
            "verdict": verdict, "text": text}


def speedup_bound(tokens_per_verify: float, verify_ratio: float, draft_ratio: float, depth: int) -> float:
    """E[tokens per verify] / (t_verify(D+1)/t_1 + D * t_draft/t_1): the speedup over plain decoding if
    nothing but the trunk forwards and the head's steps cost time."""
    cost = verify_ratio + depth * draft_ratio
    return tokens_per_verify / cost if cost > 0 else float("nan")


def expected_tokens_per_verify(acceptance_by_position: Sequence[float]) -> float:
    """1 + sum_k prod_{j<=k} a_j: tokens per verify from the per-position acceptance P(accept | reached)."""
    total, reach = 1.0, 1.0
    for a in acceptance_by_position:
        reach *= a
        total += reach
    return total


def acceptance_counts(steps, depth: int) -> tuple[list[int], list[int]]:
    """(reached, accepted) per draft position from verify StepEvents (step 0 is the prefill)."""
    reached, accepted = [0] * depth, [0] * depth
    for s in steps:
        if s.step == 0 or not s.drafted:
            continue
        for j in range(min(s.accepted + 1, s.drafted)):
            reached[j] += 1
            if j < s.accepted:
                accepted[j] += 1
    return reached, accepted


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_costs(model, context_ids: Sequence[int], max_depth: int, samplings: dict[str, Sampling],
                  repeats: int = 9) -> dict:
    """Verify-cost curve, draft-step and acceptance costs with warm caches at len(context_ids) tokens."""
    from .engine import _plain_to_host, _rollback, _to_host, draft_token, next_token

    mx.random.seed(0)
    ids = mx.array(list(context_ids))[None]
    cache = model.make_cache()
    hidden, logits = model.forward(ids, cache=cache)
    mx.eval(hidden, logits, [c.state for c in cache])
    for c in cache:  # the prefill's tape is not a verify: nothing to roll back to
        if hasattr(c, "tape"):
            c.tape = None
    vocab = logits.shape[-1]
    max_m = max_depth + 1
    probe = mx.array(list(context_ids[-max_m:]) * max_m)[: max_m][None].astype(mx.int32)
    verify_times: dict[int, list[float]] = {m: [] for m in range(1, max_m + 1)}

    def verify(m):
        h, lg = model.forward(probe[:, :m], cache=cache)
        mx.eval(h, lg)
        return h, lg

    for m in range(1, max_m + 1):  # warm-up of every shape
        verify(m)
        _rollback(cache, keep=0, discard=m)
    for _ in range(repeats):
        for m in range(1, max_m + 1):
            t = time.perf_counter()
            verify(m)
            verify_times[m].append(time.perf_counter() - t)
            _rollback(cache, keep=0, discard=m)
    verify_s = {m: statistics.median(v) for m, v in verify_times.items()}
    t1 = verify_s[1]
    out = {
        "context_tokens": len(context_ids),
        "repeats": repeats,
        "t1_ms": t1 * 1e3,
        "verify_ms": [verify_s[m] * 1e3 for m in range(1, max_m + 1)],
        "verify_ratio": [verify_s[m] / t1 for m in range(1, max_m + 1)],
        "draft_step_ms": {},
        "draft_ratio": {},
        "accept_ms": {},
    }
    if not model.has_mtp:
        return out
    head_cache = model.make_head_cache()
    g, _ = model.mtp_forward(hidden[:, :-1], ids[:, 1:], cache=head_cache)
    mx.eval(g, head_cache.state)
    g = g[:, -1:]
    token = ids[:, -1:]
    _, verify_logits = verify(max_m)
    _rollback(cache, keep=0, discard=max_m)
    draft_logits = mx.stack([verify_logits[0, -1]] * max(max_depth, 1))
    for mode, sampling in samplings.items():
        def draft_step():  # the engine's own: head layer, draft-vocabulary logits, the draw
            g2 = model.head(g, model.embed(token), cache=head_cache)
            d, dist = draft_token(model, sampling, g2)
            mx.eval(g2, d, dist)
            head_cache.trim(1)

        draft_step()
        t_draft = _timed(draft_step, repeats)
        out["draft_step_ms"][mode] = t_draft * 1e3
        out["draft_ratio"][mode] = t_draft / t1
        accept_ms = []
        for k in range(max_depth + 1):
            lg = verify_logits[0, : k + 1]
            if k:  # (no empty arrays: MLX's CUDA backend faults on some zero-size kernels)
                q = draft_logits[:k] if sampling.greedy else sampling.logprobs(draft_logits[:k])
                drafts = mx.argmax(q, axis=-1).astype(mx.int32)
                mx.eval(q, drafts)

            def accept():
                if not k:  # no drafts: plain decoding's choice
                    _plain_to_host(next_token(sampling, lg[0]))
                elif sampling.greedy:
                    _to_host(accept_greedy(lg, q, drafts))
                else:
                    _to_host(accept_sampled(sampling.logprobs(lg), q, drafts))

            accept()
            accept_ms.append(_timed(accept, repeats) * 1e3)
        out["accept_ms"][mode] = accept_ms
    out["vocab_size"] = vocab
    return out


# -- one generation ----------------------------------------------------------------------------------
def _sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    if temperature == 0:
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k}


def run_mtpnb(model, ids: list[int], depth: int, temperature: float, top_p: float, top_k: int,
              max_tokens: int, seed: int, engine=None) -> dict:
    """One mtpnb generation, timed by the consumer of the stream."""
    engine = engine or model.engine
    t0 = time.perf_counter()
    first = last = None
    n = 0
    result = None
    for event in engine.stream(ids, depth=depth, max_tokens=max_tokens, seed=seed,
                               **_sampling_kwargs(temperature, top_p, top_k)):
        if isinstance(event, TokenEvent):
            if event.kind != "rejected":
                last = time.perf_counter()
                first = first or last
                n += 1
        elif isinstance(event, Done):
            result = event.result
    end = time.perf_counter()
    return _run_record(n, t0, first, last, end, result.metrics.peak_memory_mb, result)


def run_mlx_lm(model, ids: list[int], temperature: float, top_p: float, top_k: int, max_tokens: int,
               seed: int) -> dict:
    """One generation by mlx-lm's stream_generate on the same trunk and tokenizer (plain decoding)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if temperature == 0:
        sampler = make_sampler(temp=0.0)
    else:
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0, top_k=top_k)
    mx.random.seed(seed)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for response in stream_generate(model.trunk, model.tokenizer, mx.array(ids), max_tokens=max_tokens,
                                    sampler=sampler):
        if response.finish_reason == "stop":  # the EOS token is no output
            break
        last = time.perf_counter()
        first = first or last
        n += 1
    end = time.perf_counter()
    return _run_record(n, t0, first, last, end, mx.get_peak_memory() / 2**20, None)


def _run_record(n, t0, first, last, end, peak_mb, result) -> dict:
    return {
        "tokens": n,
        "ttft_s": (first - t0) if first else end - t0,
        "decode_s": (last - first) if n > 1 else 0.0,
        "total_s": end - t0,
        "peak_memory_mb": peak_mb,
        "result": result,
    }


# -- the phase profile -------------------------------------------------------------------------------
def _profiled(model):
    """A shallow copy of `model` whose trunk forward ends in an eval barrier and records its time."""
    from .engine import Engine

    proxy = copy.copy(model)
    proxy._engine = None
    calls: list[tuple[int, float]] = []
    forward = model.forward

    def timed_forward(ids, cache=None):
        t = time.perf_counter()
        hidden, logits = forward(ids, cache=cache)
        mx.eval(hidden, logits)
        calls.append((ids.shape[1], time.perf_counter() - t))
        return hidden, logits

    proxy.forward = timed_forward
    return Engine(proxy), calls


def detokenize_seconds(tokenizer, prompt_ids, result, repeats: int = 3) -> float:
    """Time the detokenization work a generation did: the engine's Detokenizer over its output tokens
    (in the context of the prompt) and `decode([t])` for every rejected draft (median of repeats)."""
    output = [e.token for e in result.events if e.kind != "rejected"]
    rejected = [e.token for e in result.events if e.kind == "rejected"]

    def replay():
        detokenizer = Detokenizer(tokenizer, context=prompt_ids)
        for t in output:
            detokenizer.add(t)
        detokenizer.flush()
        for t in rejected:
            tokenizer.decode([t])

    return _timed(replay, repeats)


def phase_profile(model, ids, depth, temperature, top_p, top_k, max_tokens, seed) -> dict:
    """Time by phase of one generation, over its decode window (first token to last), in ms per verify
    step and per output token after the first. The trunk forward ends in an eval barrier here, which
    serializes depth 0's pipeline: the phases say where work goes, the timed runs say how fast."""
    import threading

    from . import engine as engine_module

    engine, calls = _profiled(model)
    me = threading.get_ident()
    timers: dict[str, list[float]] = {"to_host": [], "rollback": []}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            if threading.get_ident() != me:  # another thread's generation: untouched
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[key].append(time.perf_counter() - t)
        return wrapper

    patched = {"_to_host": "to_host", "_plain_to_host": "to_host", "_rollback": "rollback"}
    saved = {name: getattr(engine_module, name) for name in patched}
    for name, key in patched.items():
        setattr(engine_module, name, timed(saved[name], key))
    try:
        record = run_mtpnb(model, ids, depth, temperature, top_p, top_k, max_tokens, seed, engine=engine)
    finally:
        for name, fn in saved.items():
            setattr(engine_module, name, fn)
    result = record["result"]
    steps = result.steps
    verify_steps = steps[1:]
    tokens = len(result.tokens) - 1
    if not verify_steps or tokens < 1:
        return {}
    wall = steps[-1].elapsed_s - result.metrics.ttft_s
    totals = {
        "draft": sum(s.draft_s for s in verify_steps),
        "verify_forward": sum(s for _, s in calls[1:]),  # calls[0] is the prefill
        "accept_sync": sum(timers["to_host"][1:]),  # [0] is the prefill's first token
        "rollback": sum(timers["rollback"]),
        "detokenize": detokenize_seconds(model.tokenizer, ids, result),
    }
    totals["python"] = max(wall - sum(totals.values()), 0.0)
    n_steps = len(verify_steps)
    return {
        "steps": n_steps,
        "tokens": tokens,
        "ms_per_step": {k: totals[k] / n_steps * 1e3 for k in PHASES},
        "ms_per_token": {k: totals[k] / tokens * 1e3 for k in PHASES},
        "step_ms": wall / n_steps * 1e3,
    }


# -- the report --------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    data: dict

    # top-level conveniences
    @property
    def best_speedup_greedy(self) -> float | None:
        return self.data.get("best_speedup_greedy")

    @property
    def best_speedup_sampled(self) -> float | None:
        return self.data.get("best_speedup_sampled")

    def rows(self, engine: str | None = None, temperature: float | None = None) -> list[dict]:
        return [r for r in self.data["results"]
                if (engine is None or r["engine"] == engine) and (temperature is None or r["temperature"] == temperature)]

    def to_dict(self) -> dict:
        return self.data

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        text = json.dumps(self.data, indent=indent, allow_nan=False, default=_json_default) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def summary(self) -> str:
        """A plain-text table a person reads in a terminal."""
        d = self.data
        lines = [
            f"mtpnb bench: {d['model']['name']} ({d['model'].get('parameters', 0) / 1e6:.1f}M params, "
            f"{d['model'].get('dtype')}) on {d['platform']['machine']}, {d['platform']['cpu_count']} cores",
            d["platform"]["blas"]["message"],
            f"{len(d['settings']['prompts'])} code prompts x {d['settings']['repeats']} repeats, "
            f"max_tokens {d['settings']['max_tokens']}, context for the cost model {d['cost_model']['context_tokens']} tokens",
            "verify cost t(M)/t(1), M=1..: " + " ".join(f"{r:.2f}" for r in d["cost_model"]["verify_ratio"])
            + f"  (t1 {d['cost_model']['t1_ms']:.1f} ms)"
            + "".join(f" | draft step/t1 {m} {r:.2f}" for m, r in d["cost_model"]["draft_ratio"].items()),
            "",
            f"{'temp':>5} {'engine':>7} {'depth':>5} {'decode':>8} {'e2e':>7} {'TTFT':>6} {'speedup':>7} "
            f"{'bound':>6} {'%bound':>6} {'tok/ver':>7}  acceptance by position",
        ]
        for r in d["results"]:
            def f(v, fmt):
                return format(v, fmt) if isinstance(v, (int, float)) else "-"
            lines.append(
                f"{r['temperature']:>5.2f} {r['engine']:>7} {f(r['depth'], 'd') if r['engine'] == 'mtpnb' else '':>5} "
                f"{f(r['decode_tok_s'], '8.1f')} {f(r['end_to_end_tok_s'], '7.1f')} {f(r['ttft_ms'], '6.0f')} "
                f"{f(r.get('speedup'), '7.2f')} {f(r.get('bound'), '6.2f')} "
                f"{f(r.get('fraction_of_bound') and 100 * r['fraction_of_bound'], '5.0f')}% "
                f"{f(r.get('tokens_per_verify'), '7.2f')}  "
                + " ".join(f"{a:.2f}" for a in r.get("acceptance_by_position") or [])
            )
        lines.append("")
        for key in ("best_speedup_greedy", "best_speedup_sampled"):
            v = d.get(key)
            depth = d.get(key.replace("speedup", "depth"))
            lines.append(f"{key}: {v:.2f} (depth {depth})" if v is not None else f"{key}: -")
        for t, detail in d.get("depth0_vs_mlx_lm_detail", {}).items():
            if detail:
                lines.append(f"mtpnb depth 0 / mlx-lm plain decoding at temperature {t}: {detail['text']}")
        phase_rows = [r for r in d["results"] if r.get("phases")]
        if phase_rows:
            lines += ["", "ms per output token: " + " / ".join(PHASES)]
            for r in phase_rows:
                p = r["phases"]["ms_per_token"]
                lines.append(f"  T={r['temperature']:.2f} depth {r['depth']}: " + " / ".join(f"{p[k]:.2f}" for k in PHASES)
                             + f"  (step {r['phases']['step_ms']:.1f} ms, {r['phases']['tokens'] / r['phases']['steps']:.2f} tok/step)")
        for note in d.get("notes", []):
            lines.append("note: " + note)
        return "\n".join(lines)

    def __repr__(self) -> str:
        g, s = self.best_speedup_greedy, self.best_speedup_sampled
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        return f"<BenchReport {self.data['model']['name']}: best speedup greedy {fmt(g)}, sampled {fmt(s)}>"

    # -- figures -------------------------------------------------------------------------------------
    def figures(self) -> list:
        """Static plotly figures of the report."""
        import plotly.graph_objects as go

        d = self.data
        temps = d["settings"]["temperatures"]
        layout = {"template": "plotly_white", "font": {"size": 13}, "margin": {"t": 60, "l": 60, "r": 20, "b": 50},
                  "legend": {"orientation": "h", "y": -0.2}}
        figs = []

        speed = go.Figure()
        for i, t in enumerate(temps):
            rows = self.rows(temperature=t)
            labels = [("mlx-lm" if r["engine"] == "mlx-lm" else f"depth {r['depth']}") for r in rows]
            speed.add_bar(x=labels, y=[r["decode_tok_s"] for r in rows], name=f"temperature {t}",
                          marker_color=TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)],
                          text=[f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "" for r in rows],
                          textposition="outside",
                          hovertemplate="%{x}: %{y:.1f} tok/s<extra>temperature " + str(t) + "</extra>")
        speed.update_layout(title="Decode speed (tokens/s after the first token; median of repeats)",
                            yaxis_title="decode tok/s", barmode="group", **layout)
        figs.append(speed)

        sp = go.Figure()
        for i, t in enumerate(temps):
            rows = [r for r in self.rows("mtpnb", t)]
            color = TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)]
            sp.add_scatter(x=[r["depth"] for r in rows], y=[r.get("speedup") for r in rows], mode="lines+markers",
                           name=f"measured, T={t}", line={"color": color}, marker={"symbol": "circle", "size": 9})
            sp.add_scatter(x=[r["depth"] for r in rows], y=[r.get("bound") for r in rows], mode="lines+markers",
                           name=f"bound, T={t}", line={"color": color, "dash": "dash"},
                           marker={"symbol": "diamond-open", "size": 9})
        sp.add_hline(y=1.0, line={"color": "gray", "width": 1})
        sp.update_layout(title="Speedup over depth 0: measured (solid) and the cost-model bound (dashed)",
                         xaxis_title="depth (drafts per verify)", yaxis_title="x depth 0 decode tok/s",
                         xaxis={"dtick": 1}, **layout)
        figs.append(sp)

        cm = d["cost_model"]
        ms = list(range(1, len(cm["verify_ratio"]) + 1))
        vc = go.Figure()
        vc.add_scatter(x=ms, y=cm["verify_ratio"], mode="lines+markers", name="t_verify(M) / t_1 (measured)",
                       line={"color": COLORS["blue"]}, marker={"size": 9},
                       customdata=cm["verify_ms"], hovertemplate="M=%{x}: %{y:.2f}x (%{customdata:.1f} ms)<extra></extra>")
        vc.add_scatter(x=ms, y=ms, mode="lines", name="linear: M x t_1", line={"color": "gray", "dash": "dot"})
        for j, (mode, r) in enumerate(cm.get("draft_ratio", {}).items()):
            vc.add_scatter(x=ms, y=[r] * len(ms), mode="lines", name=f"one draft step / t_1 ({mode})",
                           line={"color": (COLORS["orange"], COLORS["green"])[j % 2], "dash": "dash"})
        vc.update_layout(title=f"Verify cost curve (warm cache of {cm['context_tokens']} tokens, t_1 = "
                               f"{cm['t1_ms']:.1f} ms; {d['platform']['blas']['kind']} BLAS)",
                         xaxis_title="tokens in one trunk forward (M = depth + 1)", yaxis_title="x one-token forward",
                         xaxis={"dtick": 1}, **layout)
        figs.append(vc)

        acc = go.Figure()
        dash = ("solid", "dash", "dot", "dashdot")
        for i, t in enumerate(temps):
            for r in self.rows("mtpnb", t):
                if r["depth"] and r.get("acceptance_by_position"):
                    acc.add_scatter(x=list(range(1, r["depth"] + 1)), y=r["acceptance_by_position"],
                                    mode="lines+markers", name=f"T={t}, depth {r['depth']}",
                                    line={"color": TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)],
                                          "dash": dash[(r["depth"] - 1) % len(dash)]})
        acc.update_layout(title="Acceptance per draft position, P(accepted | reached)", xaxis_title="draft position",
                          yaxis_title="acceptance", yaxis={"range": [0, 1.05]}, xaxis={"dtick": 1}, **layout)
        figs.append(acc)

        ph = go.Figure()
        rows = [r for r in d["results"] if r.get("phases")]
        labels = [f"T={r['temperature']} d{r['depth']}" for r in rows]
        for k in PHASES:
            ph.add_bar(x=labels, y=[r["phases"]["ms_per_token"][k] for r in rows], name=k.replace("_", " "),
                       marker_color=PHASE_COLORS[k], hovertemplate="%{x}: %{y:.2f} ms/token<extra>" + PHASE_DOC[k] + "</extra>")
        ph.update_layout(title="Where the time goes: ms per output token, by phase (one profiled run each)",
                         yaxis_title="ms per output token", barmode="stack", **layout)
        figs.append(ph)
        return figs

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """A standalone HTML report: summary, tables and static plotly figures, plotly.js inline (no CDN)."""
        from plotly.offline import get_plotlyjs

        d = self.data
        esc = html.escape
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>mtpnb bench: {esc(d['model']['name'])}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}"
            "table{border-collapse:collapse;margin:12px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}th{background:#f2f2f2}td.l,th.l{text-align:left}.note{color:#555;font-size:13px}"
            ".big{font-size:20px}</style>",
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
            f"<h1>mtpnb bench: {esc(d['model']['name'])}</h1>",
            f"<p class='big'>Best speedup over depth 0: greedy <b>{_fmt(d.get('best_speedup_greedy'), 'x')}</b> "
            f"(depth {d.get('best_depth_greedy')}), sampled <b>{_fmt(d.get('best_speedup_sampled'), 'x')}</b> "
            f"(depth {d.get('best_depth_sampled')})</p>",
            f"<p>{esc(d['platform']['blas']['message'])}</p>",
            "<p>" + "<br>".join(
                f"mtpnb depth 0 / mlx-lm plain decoding at T={esc(str(t))}: <b>{_fmt(v.get('ratio'), 'x', 3)}</b> "
                f"({esc(v['text'])})" for t, v in d.get("depth0_vs_mlx_lm_detail", {}).items() if v) + "</p>",
            f"<p class='note'>{esc(_settings_line(d))}</p>",
            _results_table(d),
        ]
        for fig in self.figures():
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        parts.append("<h3>Phases</h3><ul class='note'>" + "".join(
            f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in PHASE_DOC.items()) + "</ul>")
        if d.get("blas_comparison"):
            parts.append(_blas_table(d["blas_comparison"]))
        parts.append("<h3>Notes</h3><ul class='note'>" + "".join(f"<li>{esc(n)}</li>" for n in d.get("notes", []))
                     + "</ul>")
        parts.append("<h3>Prompts</h3><ul class='note'>" + "".join(
            f"<li>{esc(p['name'])}: {p['tokens']} tokens</li>" for p in d["settings"]["prompts"]) + "</ul>")
        parts.append(f"<p class='note'>{esc(json.dumps(d['platform'], default=_json_default))}</p></body></html>")
        text = "\n".join(parts)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _fmt(v, suffix="", digits=2):
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def _settings_line(d) -> str:
    s = d["settings"]
    return (f"{len(s['prompts'])} code prompts, {s['repeats']} repeats after {s['warmup']} warm-up, max_tokens "
            f"{s['max_tokens']}, top_p {s['top_p']}, top_k {s['top_k']} when sampling; mlx {d['platform']['mlx']}, "
            f"mlx-lm {d['platform']['mlx_lm']}, {d['platform']['cpu_count']} cores, {d['platform']['machine']}; "
            f"{d['created']}")


def _results_table(d) -> str:
    head = ("<table><tr><th>T</th><th class='l'>engine</th><th>depth</th><th>decode tok/s</th><th>end-to-end tok/s"
            "</th><th>TTFT ms</th><th>speedup</th><th>bound</th><th>% of bound</th><th>tokens/verify</th>"
            "<th class='l'>acceptance by position</th><th>peak MB</th></tr>")
    rows = []
    for r in d["results"]:
        frac = r.get("fraction_of_bound")
        rows.append(
            f"<tr><td>{r['temperature']}</td><td class='l'>{r['engine']}</td>"
            f"<td>{r['depth'] if r['engine'] == 'mtpnb' else ''}</td><td>{_fmt(r['decode_tok_s'], '', 1)}</td>"
            f"<td>{_fmt(r['end_to_end_tok_s'], '', 1)}</td><td>{_fmt(r['ttft_ms'], '', 0)}</td>"
            f"<td>{_fmt(r.get('speedup'), 'x')}</td><td>{_fmt(r.get('bound'), 'x')}</td>"
            f"<td>{_fmt(frac and 100 * frac, '%', 0) if frac is not None else '-'}</td>"
            f"<td>{_fmt(r.get('tokens_per_verify'))}</td>"
            f"<td class='l'>{' '.join(f'{a:.2f}' for a in r.get('acceptance_by_position') or [])}</td>"
            f"<td>{_fmt(r.get('peak_memory_mb'), '', 0)}</td></tr>")
    return head + "".join(rows) + "</table>"


def _blas_table(comp: dict) -> str:
    out = ["<h3>BLAS: the same model with and without OpenBLAS preloaded</h3><table><tr><th class='l'>BLAS</th>"
           "<th>depth-0 decode tok/s</th><th>t_1 ms</th><th class='l'>t_verify(M)/t_1, M = 1..</th></tr>"]
    for name, r in comp.items():
        if not isinstance(r, dict) or "decode_tok_s" not in r:
            continue
        out.append(f"<tr><td class='l'>{html.escape(name)} ({html.escape(str(r.get('kind')))})</td>"
                   f"<td>{_fmt(r['decode_tok_s'], '', 1)}</td><td>{_fmt(r['t1_ms'], '', 1)}</td>"
                   f"<td class='l'>{' '.join(f'{x:.2f}' for x in r['verify_ratio'])}</td></tr>")
    return "".join(out) + "</table>"


# -- the run -----------------------------------------------------------------------------------------
def run_bench(
    model,
    *,
    prompts: Sequence[str] | Sequence[dict] | None = None,
    depths: Sequence[int] = (0, 1, 2, 3, 4),
    temperatures: Sequence[float] = (0.0, 0.6),
    top_p: float = 0.95,
    top_k: int = 20,
    max_tokens: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    quick: bool = False,
    peers: bool = True,
    phases: bool = True,
    cost_repeats: int | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark `model` (an mtpnb.Model): depths against depth 0 and mlx-lm, alternately, in this process.

    prompts: texts (or {"name", "text"} dicts); default: code prompts from the held-out modules
        (6, or 2 with quick=True). max_tokens / repeats / warmup default to FULL or QUICK.
    progress(done, total, label) is called before each generation.
    """
    preset = QUICK if quick else FULL
    max_tokens = preset["max_tokens"] if max_tokens is None else max_tokens
    repeats = preset["repeats"] if repeats is None else repeats
    warmup = preset["warmup"] if warmup is None else warmup
    cost_repeats = preset["cost_repeats"] if cost_repeats is None else cost_repeats
    if max_tokens < 2 or repeats < 1 or warmup < 0:
        raise MTPNBError("max_tokens must be >= 2, repeats >= 1 and warmup >= 0")
    notes: list[str] = []
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    depths = sorted(set(int(d) for d in depths) | {0})
    if not model.has_mtp and depths != [0]:
        notes.append(f"{model.name} has no MTP head: only depth 0 was run")
        depths = [0]
    temperatures = [float(t) for t in temperatures]
    if not temperatures:
        raise MTPNBError("give at least one temperature")
    if prompts is None:
        prompt_list = code_prompts(preset["prompts"], modules=heldout_modules(getattr(model, "path", None)))
    else:
        prompt_list = [dict(p) if isinstance(p, dict) else {"name": f"prompt {i}", "text": p}
                       for i, p in enumerate(prompts)]
    if not prompt_list:
        raise MTPNBError("no prompts")
    encoded = [model.engine.encode(p["text"]) for p in prompt_list]
    for p, ids in zip(prompt_list, encoded):
        p["tokens"] = len(ids)
        p["sha256"] = hashlib.sha256(p["text"].encode()).hexdigest()[:16]

    from .blas import blas_info

    blas = blas_info(timing=True)
    samplings = {}
    if any(t == 0 for t in temperatures):
        samplings["greedy"] = Sampling()
    for t in temperatures:
        if t > 0:
            samplings[f"T={t}"] = Sampling(t, top_p, top_k)
    max_depth = max(depths)

    # the cost model: a context as long as a prompt plus half the generation
    context_len = int(statistics.mean(len(e) for e in encoded)) + max_tokens // 2
    base = [t for e in encoded for t in e]
    context = (base * (context_len // len(base) + 1))[:context_len]
    cost = measure_costs(model, context, max(max_depth, 1) if model.has_mtp else max_depth, samplings,
                         repeats=cost_repeats)

    configs = [("mlx-lm", 0)] if peers else []
    configs += [("mtpnb", d) for d in depths]
    total = warmup * len(configs) * len(temperatures) + repeats * len(prompt_list) * len(temperatures) * len(configs)
    if phases:
        total += len(depths) * len(temperatures)
    done = 0

    def tick(label):
        nonlocal done
        if progress:
            progress(done, total, label)
        done += 1

    def run(engine, depth, ids, t, seed, tokens):
        if engine == "mlx-lm":
            return run_mlx_lm(model, ids, t, top_p, top_k, tokens, seed)
        return run_mtpnb(model, ids, depth, t, top_p, top_k, tokens, seed)

    for w in range(warmup):
        for t in temperatures:
            for engine, depth in configs:
                tick(f"warm-up {engine} depth {depth} T={t}")
                run(engine, depth, encoded[0], t, 12345 + w, min(max_tokens, 16))

    records: dict[tuple, list[list[dict]]] = {(e, d, t): [[] for _ in range(repeats)] for e, d in configs for t in temperatures}
    for r in range(repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for i, ids in enumerate(encoded):
            for t in temperatures:
                for engine, depth in order:
                    tick(f"repeat {r + 1}/{repeats}, prompt {i + 1}/{len(encoded)}, T={t}, {engine} depth {depth}")
                    records[(engine, depth, t)][r].append(run(engine, depth, ids, t, 1000 * r + i, max_tokens))

    profiles = {}
    if phases:
        for t in temperatures:
            for depth in depths:
                tick(f"phase profile depth {depth} T={t}")
                profiles[(depth, t)] = phase_profile(model, encoded[0], depth, t, top_p, top_k, max_tokens, 777)

    results = []
    per_repeat_rate = {k: [_rate(runs) for runs in v] for k, v in records.items()}
    for t in temperatures:
        mode = "greedy" if t == 0 else f"T={t}"
        base_rates = per_repeat_rate.get(("mtpnb", 0, t))
        for engine, depth in configs:
            runs = [x for rep in records[(engine, depth, t)] for x in rep]
            rates = per_repeat_rate[(engine, depth, t)]
            row = {
                "engine": engine,
                "depth": depth,
                "temperature": t,
                "decode_tok_s": median(rates),
                "decode_tok_s_repeats": rates,
                "end_to_end_tok_s": median(_e2e(rep) for rep in records[(engine, depth, t)]),
                "ttft_ms": median(x["ttft_s"] * 1e3 for x in runs),
                "generated_tokens": sum(x["tokens"] for x in runs),
                "runs": len(runs),
                "peak_memory_mb": max(x["peak_memory_mb"] for x in runs),
            }
            if engine == "mtpnb":
                steps = [s for x in runs for s in x["result"].steps]
                verify = [s for s in steps if s.step > 0]
                row["verify_calls"] = len(verify)
                row["tokens_per_verify"] = (1 + sum(s.accepted for s in verify) / len(verify)) if verify else None
                row["tokens_per_verify_emitted"] = sum(s.emitted for s in verify) / len(verify) if verify else None
                if depth:
                    reached, accepted = acceptance_counts(steps, depth)
                    row["acceptance_by_position"] = [a / n if n else 0.0 for a, n in zip(accepted, reached)]
                    row["acceptance_rate"] = (sum(s.accepted for s in verify) / sum(s.drafted for s in verify)
                                              if verify else None)
                else:
                    row["acceptance_by_position"] = []
                    row["acceptance_rate"] = None
                if base_rates:
                    row["speedup"] = median(a / b for a, b in zip(rates, base_rates) if a and b)
                    row["speedup_repeats"] = [a / b if a and b else None for a, b in zip(rates, base_rates)]
                verify_ratio = cost["verify_ratio"][depth] if depth < len(cost["verify_ratio"]) else None
                draft_ratio = cost["draft_ratio"].get(mode, 0.0) if depth else 0.0
                if verify_ratio is not None and row["tokens_per_verify"]:
                    row["bound"] = speedup_bound(row["tokens_per_verify"], verify_ratio, draft_ratio, depth)
                    row["fraction_of_bound"] = (row["speedup"] / row["bound"]
                                                if row.get("speedup") and row["bound"] else None)
                row["phases"] = profiles.get((depth, t)) or None
            else:
                row["speedup"] = median(a / b for a, b in zip(rates, base_rates) if a and b) if base_rates else None
            results.append(row)

    best = {}
    for label, selected in (("greedy", [t for t in temperatures if t == 0]), ("sampled", [t for t in temperatures if t > 0])):
        cands = [r for r in results if r["engine"] == "mtpnb" and r["depth"] > 0 and r["temperature"] in selected
                 and r.get("speedup") is not None]
        top = max(cands, key=lambda r: r["speedup"], default=None)
        best[f"best_speedup_{label}"] = top["speedup"] if top else None
        best[f"best_depth_{label}"] = top["depth"] if top else None
        best[f"best_fraction_of_bound_{label}"] = top.get("fraction_of_bound") if top else None
    vs_mlx, vs_mlx_detail = {}, {}
    if peers:
        for t in temperatures:
            pairs = [(_rate([a]), _rate([b])) for rep_a, rep_b in zip(records[("mtpnb", 0, t)], records[("mlx-lm", 0, t)])
                     for a, b in zip(rep_a, rep_b)]
            detail = parity([a / b for a, b in pairs if a and b])
            vs_mlx[str(t)] = detail.get("ratio")
            vs_mlx_detail[str(t)] = detail
    notes.append("mlx-lm's speculative decoding (stream_generate with draft_model=) needs a separate draft model; "
                 "none applies to an MTP checkpoint, so it is not run.")
    if blas["kind"] == "reference":
        notes.append("MLX is on the reference BLAS: verifies cost ~linearly in tokens here; see the BLAS line.")
    bounds = [r for r in results if r["engine"] == "mtpnb" and r["depth"] and r.get("bound")]
    if bounds:
        top = max(bounds, key=lambda r: r["bound"])
        if top["bound"] < 1.5:
            notes.append(
                f"The cost curve caps MTP here: the best bound is {top['bound']:.2f}x (depth {top['depth']}, "
                f"T={top['temperature']}, {top['tokens_per_verify']:.2f} tokens per verify against a verify of "
                f"{cost['verify_ratio'][top['depth']]:.2f} t_1 plus {top['depth']} draft steps of "
                f"{cost['draft_ratio'].get('greedy' if top['temperature'] == 0 else 'T=' + str(top['temperature']), 0):.2f} t_1).")
    if quick:
        notes.append("quick mode: few prompts and tokens, one repeat: the figures are indicative only.")

    info = _model_info(model)
    data = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **best,
        "depth0_vs_mlx_lm": vs_mlx,
        "depth0_vs_mlx_lm_detail": vs_mlx_detail,
        "model": info,
        "platform": _platform_info(blas),
        "settings": {
            "depths": depths, "temperatures": temperatures, "top_p": top_p, "top_k": top_k,
            "max_tokens": max_tokens, "repeats": repeats, "warmup": warmup, "quick": quick, "peers": peers,
            "prompts": [{k: p[k] for k in ("name", "tokens", "sha256")} for p in prompt_list],
            "decode_tok_s": "(tokens - 1) / (time of the last output token - time of the first), per repeat over "
                            "all prompts, then the median of repeats",
            "speedup": "decode tok/s of depth d / depth 0 of the same repeat, median of repeats",
            "depth0_vs_mlx_lm": "decode tok/s of mtpnb depth 0 / mlx-lm for each prompt and repeat (the two runs "
                                "are adjacent in time), median of those pairs, with a bootstrap interval",
        },
        "cost_model": cost,
        "phases_doc": PHASE_DOC,
        "results": results,
        "peers": {
            "mlx_lm_stream_generate": {"applicable": bool(peers)},
            "mlx_lm_speculative": {"applicable": False,
                                   "reason": "needs a separate draft model; an MTP head is not one"},
        },
        "notes": notes,
    }
    if load_start is not None:  # a busy machine makes every figure noisier: say how busy it was
        data["platform"]["load_average"] = load_start
        data["platform"]["load_average_end"] = list(os.getloadavg())
    if progress:
        progress(total, total, "done")
    return BenchReport(_clean(data))


def _rate(runs: list[dict]) -> float | None:
    tokens = sum(max(x["tokens"] - 1, 0) for x in runs)
    seconds = sum(x["decode_s"] for x in runs)
    return tokens / seconds if seconds > 0 else None


def _e2e(runs: list[dict]) -> float | None:
    seconds = sum(x["total_s"] for x in runs)
    return sum(x["tokens"] for x in runs) / seconds if seconds > 0 else None


def _clean(o):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    return o


def _model_info(model) -> dict:
    try:
        info = model.info()
    except Exception:  # noqa: BLE001  (a report without model details beats no report)
        info = {"name": getattr(model, "name", "?")}
    return {k: info.get(k) for k in ("name", "path", "family", "parameters", "head_parameters", "layers",
                                     "linear_attention_layers", "hidden_size", "vocab_size", "has_mtp", "dtype",
                                     "quantization", "weights_mb", "device")}


def _platform_info(blas: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": py_platform.python_version(),
        "machine": f"{py_platform.system()} {py_platform.machine()}",
        "processor": py_platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mlx": v("mlx"),
        "mlx_lm": v("mlx-lm") or v("mlx_lm"),
        "device": str(mx.default_device()),
        "blas": blas,
    }


# -- a stand-in for the default model ----------------------------------------------------------------
STANDIN_CONFIG = {  # the default model's shape (mtpnb.train.model.build_config): 18.5M params
    "vocab_size": 8192, "hidden_size": 384, "num_hidden_layers": 8, "intermediate_size": 1024,
    "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64, "full_attention_interval": 4,
    "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 64,
    "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "max_position_embeddings": 4096, "eos_token_id": 0, "pad_token_id": 0,
    "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0, "partial_rotary_factor": 0.25},
    "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "torch_dtype": "float32",
}


def make_standin(path: str | os.PathLike, head: str = "echo", seed: int = 0) -> Path:
    """A random checkpoint shaped like the default model (same config, a BPE tokenizer of the same size
    trained on a slice of the standard library), in the MLX layout, for benchmarking the machinery before
    the trained model exists. head="echo" drafts the trunk's own last token (some acceptance on the
    repetitive text of a random trunk); "random" accepts almost nothing. Its speedups mean nothing."""
    from mlx.utils import tree_flatten

    from .head import MTPHead, head_args
    from .loading import _model_classes, read_config
    from .testing import _echo, _randomized

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = dict(STANDIN_CONFIG)
    config["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(8)]
    config["mtp_norms_shifted"] = True
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _standin_tokenizer(path, config["vocab_size"])
    mx.random.seed(seed)
    trunk_class, args_class = _model_classes(read_config(path))
    trunk = trunk_class(args_class.from_dict(read_config(path)))
    weights = _randomized(dict(tree_flatten(trunk.parameters())), 1.0)
    head_weights = dict(tree_flatten(MTPHead(head_args(config)).parameters()))
    head_weights = _echo(head_weights) if head == "echo" else _randomized(head_weights, 1.0)
    weights.update({f"mtp.{k}": v for k, v in head_weights.items()})
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def _standin_tokenizer(path: Path, vocab_size: int) -> None:
    from .train.tokenizer import save_tokenizer, train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    held = set(heldout_modules())
    texts, size = [], 0
    for f in sorted(root.glob("*.py")):
        if f.stem in held:
            continue
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        size += len(texts[-1])
        if size > 4_000_000:
            break
    if not texts:
        texts = [t for _, t in FALLBACK_PROMPTS] * 50
    save_tokenizer(train_tokenizer(texts, vocab_size), path, 4096)


# -- BLAS comparison in two subprocesses ---------------------------------------------------------------
def compare_blas(model_arg: str | None, *, max_tokens: int = 64, repeats: int = 3, max_depth: int = 4,
                 timeout: float = 900) -> dict:
    """Depth-0 decode tok/s and the verify-cost curve of the same model with MLX's bundled BLAS and with
    OpenBLAS preloaded, each in its own subprocess (one after the other)."""
    import subprocess
    import tempfile

    from .blas import OPT_OUT_ENV, openblas_path

    library = openblas_path()
    if not sys.platform.startswith("linux"):
        return {"skipped": "not Linux"}
    if not library:
        return {"skipped": "OpenBLAS is not installed (apt-get install libopenblas0-pthread)"}
    out = {}
    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    variants = {"bundled": {**base_env, OPT_OUT_ENV: "1"},
                "openblas": {**base_env, OPT_OUT_ENV: "1", "LD_PRELOAD": library}}
    for name, env in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            json_path = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "mtpnb.bench", *([model_arg] if model_arg else []),
                   "--depths", ",".join(str(d) for d in range(max_depth + 1)), "--temperatures", "0",
                   "--max-tokens", str(max_tokens), "--repeats", str(repeats), "--prompts", "2", "--no-peers",
                   "--no-phases", "--json", str(json_path), "--quiet"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0 or not json_path.exists():
                out[name] = {"error": (proc.stderr or proc.stdout).strip()[-500:]}
                continue
            r = json.loads(json_path.read_text())
            rows = {row["depth"]: row for row in r["results"] if row["engine"] == "mtpnb"}
            out[name] = {
                "kind": r["platform"]["blas"]["kind"],
                "library": r["platform"]["blas"]["library"],
                "gflops": r["platform"]["blas"].get("gflops"),
                "decode_tok_s": rows[0]["decode_tok_s"],
                "decode_tok_s_by_depth": {str(d): row["decode_tok_s"] for d, row in rows.items()},
                "t1_ms": r["cost_model"]["t1_ms"],
                "verify_ratio": r["cost_model"]["verify_ratio"],
                "draft_ratio": r["cost_model"]["draft_ratio"].get("greedy"),
                "command": " ".join(cmd[1:-1]),
            }
    if "decode_tok_s" in out.get("bundled", {}) and "decode_tok_s" in out.get("openblas", {}):
        out["depth0_decode_gain"] = out["openblas"]["decode_tok_s"] / out["bundled"]["decode_tok_s"]
    return out


# -- command line ------------------------------------------------------------------------------------
def depth_list(text: str) -> list[int]:
    """"0,1,3" -> [0, 1, 3] (argparse type for --depths; the magic uses it too)."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or any(v < 0 or v > 8 for v in values):
        raise argparse.ArgumentTypeError("depths are integers from 0 to 8")
    return values


def temperature_list(text: str) -> list[float]:
    """"0,0.6" -> [0.0, 0.6] (argparse type for --temperatures)."""
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("temperatures are numbers >= 0")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a model folder or Hugging Face repo id (default: the embedded default model)")
    parser.add_argument("--quick", action="store_true",
                        help="a minute or two on 2 cores: 2 prompts, 32 tokens, 1 repeat (figures indicative only)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--html", metavar="PATH", help="write the report as standalone HTML (plotly inline)")
    parser.add_argument("--depths", type=depth_list, default=[0, 1, 2, 3, 4], metavar="LIST",
                        help="depths to run, comma-separated (depth 0 always runs; default 0,1,2,3,4)")
    parser.add_argument("--temperatures", type=temperature_list, default=[0.0, 0.6], metavar="LIST",
                        help="temperatures, comma-separated (default 0,0.6)")
    parser.add_argument("--top-p", type=float, default=0.95, help="top-p when sampling (default 0.95)")
    parser.add_argument("--top-k", type=int, default=20, help="top-k when sampling (default 20)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help=f"tokens per generation (default {FULL['max_tokens']}, quick {QUICK['max_tokens']})")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help=f"measured repeats (default {FULL['repeats']}, quick {QUICK['repeats']})")
    parser.add_argument("--warmup", type=int, default=None, metavar="N", help="warm-up rounds (default 1)")
    parser.add_argument("--prompts", type=int, default=None, metavar="N",
                        help=f"number of code prompts (default {FULL['prompts']}, quick {QUICK['prompts']})")
    parser.add_argument("--prompt-file", metavar="FILE", action="append",
                        help="use the text of FILE as a prompt (repeatable) instead of the code prompts")
    parser.add_argument("--no-peers", action="store_true", help="skip mlx-lm's stream_generate")
    parser.add_argument("--no-phases", action="store_true", help="skip the per-phase profile runs")
    parser.add_argument("--compare-blas", action="store_true",
                        help="also measure depth 0 and the verify-cost curve with and without OpenBLAS (two subprocesses)")
    parser.add_argument("--standin", metavar="DIR",
                        help="bench a random checkpoint shaped like the default model, written to DIR if missing "
                             "(machinery only: its speedups mean nothing)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the float weights (default: float32 on the CPU)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="quantize the weights at load")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_bench_arguments(argparse.ArgumentParser(prog="mtpnb bench", description=DESCRIPTION))


def run_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """What `mtpnb bench` does with parsed arguments; returns the exit code."""
    from .loading import load

    model_arg = args.model
    if args.standin:
        if args.model:
            print("mtpnb bench: give MODEL or --standin, not both", file=sys.stderr)
            return 2
        model_arg = str(make_standin(args.standin))
    try:
        model = load(model_arg, dtype=args.dtype, quantize=args.quantize)
    except MTPNBError as e:
        print(f"mtpnb bench: {e}", file=sys.stderr)
        return 2
    prompts = None
    if args.prompt_file:
        prompts = [{"name": Path(f).name, "text": Path(f).read_text(encoding="utf-8")} for f in args.prompt_file]
    elif args.prompts is not None:
        prompts = code_prompts(args.prompts, modules=heldout_modules(model.path))
    started = time.perf_counter()

    def progress(done, total, label):
        if not args.quiet:
            print(f"[{done:>3}/{total}] {time.perf_counter() - started:6.1f}s {label}", file=sys.stderr, flush=True)

    try:
        report = run_bench(
            model, prompts=prompts, depths=args.depths, temperatures=args.temperatures, top_p=args.top_p,
            top_k=args.top_k, max_tokens=args.max_tokens, repeats=args.repeats, warmup=args.warmup,
            quick=args.quick, peers=not args.no_peers, phases=not args.no_phases, progress=progress,
        )
    except MTPNBError as e:
        print(f"mtpnb bench: {e}", file=sys.stderr)
        return 2
    if args.compare_blas:
        if not args.quiet:
            print("comparing BLAS libraries in two subprocesses...", file=sys.stderr, flush=True)
        report.data["blas_comparison"] = _clean(compare_blas(model_arg))
    report.data["command"] = "mtpnb bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report.data["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        report.to_json(args.json)
    if args.html:
        report.to_html(args.html)
    if not args.quiet:
        print(report.summary())
        if report.data.get("blas_comparison"):
            print(json.dumps(report.data["blas_comparison"], indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
