"""The runs: one timed generation (mtpnb or mlx-lm), the phase profile, and the schedule that
alternates every configuration so that drift on a shared machine touches them alike.

A configuration is a `Config` (engine, depth, model label): the schedule runs each of them per repeat,
prompt and temperature, the order turning round every repeat, and the rows are built per
configuration. Comparing two models in one run is two models' configurations in the same schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..detokenizer import Detokenizer
from ..engine import Engine
from ..events import Done, TokenEvent
from ..metrics import loops
from .costs import median_time

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


@dataclass(frozen=True, eq=False)  # one object per configuration: hashed by identity
class Config:
    """One configuration of the schedule: an engine ("mtpnb" or "mlx-lm") at a depth, on a model."""

    engine: str
    depth: int
    model: Any  # an mtpnb.Model

    @property
    def label(self) -> str:
        return "mlx-lm" if self.engine == "mlx-lm" else f"depth {self.depth}"


@dataclass(frozen=True)
class Sampler:
    """The sampling settings of a run: greedy at temperature 0, else top_p / top_k as given."""

    temperature: float
    top_p: float
    top_k: int

    def params(self) -> dict:
        if self.temperature == 0:
            return {"temperature": 0.0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def run(config: Config, ids: list[int], sampler: Sampler, max_tokens: int, seed: int) -> dict:
    if config.engine == "mlx-lm":
        return run_mlx_lm(config.model, ids, sampler, max_tokens, seed)
    return run_mtpnb(config.model.engine, ids, config.depth, sampler, max_tokens, seed)


def run_mtpnb(engine: Engine, ids: list[int], depth: int, sampler: Sampler, max_tokens: int, seed: int) -> dict:
    """One mtpnb generation, timed by the consumer of the stream."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    result = None
    for event in engine.stream(ids, depth=depth, max_tokens=max_tokens, seed=seed, **sampler.params()):
        if isinstance(event, TokenEvent):
            if event.kind != "rejected":
                last = time.perf_counter()
                first = first or last
                n += 1
        elif isinstance(event, Done):
            result = event.result
    end = time.perf_counter()
    return _record(n, result.tokens, t0, first, last, end, result.metrics.peak_memory_mb, result)


def run_mlx_lm(model, ids: list[int], sampler: Sampler, max_tokens: int, seed: int) -> dict:
    """One generation by mlx-lm's stream_generate on the same trunk and tokenizer (plain decoding)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    t = sampler.temperature
    if t == 0:
        sample = make_sampler(temp=0.0)
    else:
        sample = make_sampler(temp=t, top_p=sampler.top_p if sampler.top_p < 1 else 0.0, top_k=sampler.top_k)
    mx.random.seed(seed)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    first = last = None
    output = []
    for response in stream_generate(model.trunk, model.tokenizer, mx.array(ids), max_tokens=max_tokens,
                                    sampler=sample):
        if response.finish_reason == "stop":  # the EOS token is no output
            break
        last = time.perf_counter()
        first = first or last
        output.append(response.token)
    end = time.perf_counter()
    return _record(len(output), output, t0, first, last, end, mx.get_peak_memory() / 2**20, None)


def _record(n: int, output: list[int], t0, first, last, end, peak_mb, result) -> dict:
    return {
        "tokens": n,
        "loops": loops(output),
        "ttft_s": (first - t0) if first else end - t0,
        "decode_s": (last - first) if n > 1 else 0.0,
        "total_s": end - t0,
        "peak_memory_mb": peak_mb,
        "result": result,
    }


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

    return median_time(replay, repeats)


def phase_profile(model, ids, depth: int, sampler: Sampler, max_tokens: int, seed: int) -> dict:
    """Time by phase of one generation, over its decode window (first token to last), in ms per verify
    step and per output token after the first, from the engine's profiling (Engine(profile=True): each
    phase ends in an eval barrier, which serializes depth 0's pipeline: the phases say where the work
    goes, the timed runs how fast)."""
    record = run_mtpnb(Engine(model, profile=True), ids, depth, sampler, max_tokens, seed)
    result = record["result"]
    steps = result.steps
    verify_steps = steps[1:]
    tokens = len(result.tokens) - 1
    if not verify_steps or tokens < 1:
        return {}

    def phase(name):
        return sum(s.phases[name] for s in steps if s.phases)

    wall = steps[-1].elapsed_s - result.metrics.ttft_s
    totals = {
        "draft": sum(s.draft_s for s in verify_steps),
        "verify_forward": phase("verify_forward_s"),
        "accept_sync": phase("accept_sync_s"),
        "rollback": phase("rollback_s"),
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


def schedule(configs: list[Config], encoded: dict[int, list[list[int]]], samplers: list[Sampler], *,
             repeats: int, warmup: int, max_tokens: int, tick) -> dict[tuple[Config, Sampler], list[list[dict]]]:
    """Warm up every configuration, then for every repeat, prompt and sampler run each configuration
    once, the order turning round every repeat. encoded: the prompts' ids per model, keyed by
    id(model) (two compared models may tokenize the same text differently). Returns the runs per
    (config, sampler): one list per repeat, one record per prompt. tick(label) is called before each
    generation."""
    prompts = len(next(iter(encoded.values())))
    for w in range(warmup):
        for sampler in samplers:
            for config in configs:
                tick(f"warm-up {config.engine} depth {config.depth} T={sampler.temperature}")
                run(config, encoded[id(config.model)][0], sampler, min(max_tokens, 16), 12345 + w)
    records = {(c, s): [[] for _ in range(repeats)] for c in configs for s in samplers}
    for r in range(repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for i in range(prompts):
            for sampler in samplers:
                for config in order:
                    tick(f"repeat {r + 1}/{repeats}, prompt {i + 1}/{prompts}, T={sampler.temperature}, "
                         f"{config.engine} depth {config.depth}")
                    ids = encoded[id(config.model)][i]
                    records[(config, sampler)][r].append(run(config, ids, sampler, max_tokens, 1000 * r + i))
    return records
