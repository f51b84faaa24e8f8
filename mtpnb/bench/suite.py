"""`run_bench`: the cost model, the alternated runs and the phase profile of one model, gathered
into a BenchReport (rows per configuration and temperature, the best speedups, parity with mlx-lm)."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import statistics
from collections.abc import Callable, Sequence

import mlx.core as mx

from ..errors import MTPNBError
from ..metrics import acceptance_by_position
from ..sampling import Sampling
from .costs import measure_costs, speedup_bound
from .prompts import code_prompts, heldout_modules
from .report import BenchReport
from .runs import PHASE_DOC, Config, Sampler, phase_profile, schedule
from .stats import decode_rate, end_to_end_rate, json_safe, median, non_looping_speedup, parity

SCHEMA = "mtpnb.bench/1"
FULL = {"prompts": 6, "max_tokens": 128, "repeats": 3, "warmup": 1, "cost_repeats": 9}
QUICK = {"prompts": 2, "max_tokens": 64, "repeats": 1, "warmup": 1, "cost_repeats": 5}
LOOP_SHARE_GAP = 0.25  # two compared models' shares of looping completions this far apart get a note

Progress = Callable[[int, int, str], None]


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
    other=None,
) -> BenchReport:
    """Benchmark `model` (an mtpnb.Model): depths against depth 0 and mlx-lm, alternately, in this process.

    prompts: texts (or {"name", "text"} dicts); default: code prompts from the held-out modules
        (6, or 2 with quick=True). max_tokens / repeats / warmup default to FULL or QUICK.
    progress(done, total, label) is called before each generation.
    other: a second mtpnb.Model with an MTP head (its own tokenizer: the same prompt texts); its depths
        run in the same schedule, alternated with `model`'s, and data["compare"] holds its rows, best
        speedups and cost model.
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
    prompt_list = _prompt_list(model, prompts, preset["prompts"])
    encoded = [model.engine.encode(p["text"]) for p in prompt_list]
    for p, ids in zip(prompt_list, encoded):
        p["tokens"] = len(ids)
        p["sha256"] = hashlib.sha256(p["text"].encode()).hexdigest()[:16]

    from ..blas import blas_info

    blas = blas_info(timing=True)
    samplers = [Sampler(t, top_p, top_k) for t in temperatures]
    cost = _cost_model(model, encoded, samplers, max(depths), max_tokens, cost_repeats)

    configs = [Config("mlx-lm", 0, model)] if peers else []
    configs += [Config("mtpnb", d, model) for d in depths]
    other_configs, other_cost = [], None
    encoded_by_model = {id(model): encoded}
    if other is not None:
        if not other.has_mtp:
            raise MTPNBError(f"--compare needs a model with an MTP head; {other.name} has none")
        other_encoded = [other.engine.encode(p["text"]) for p in prompt_list]
        encoded_by_model[id(other)] = other_encoded
        other_cost = _cost_model(other, other_encoded, samplers, max(depths), max_tokens, cost_repeats)
        other_configs = [Config("mtpnb", d, other) for d in depths]
        configs += other_configs
    total = warmup * len(configs) * len(samplers) + repeats * len(encoded) * len(samplers) * len(configs)
    if phases:
        total += len(depths) * len(samplers)
    done = 0

    def tick(label):
        nonlocal done
        if progress:
            progress(done, total, label)
        done += 1

    records = schedule(configs, encoded_by_model, samplers, repeats=repeats, warmup=warmup, max_tokens=max_tokens,
                       tick=tick)
    profiles = {}
    if phases:
        for sampler in samplers:
            for depth in depths:
                tick(f"phase profile depth {depth} T={sampler.temperature}")
                profiles[(depth, sampler)] = phase_profile(model, encoded[0], depth, sampler, max_tokens, 777)

    results = [_row(config, sampler, records, cost, profiles.get((config.depth, sampler)))
               for sampler in samplers for config in configs if config not in other_configs]
    compared = None
    if other is not None:
        other_results = [_row(config, sampler, records, other_cost, None)
                         for sampler in samplers for config in other_configs]
        compared = {"model": model_info(other), **_best(other_results, temperatures), "cost_model": other_cost,
                    "prompt_tokens": [len(ids) for ids in other_encoded], "results": other_results}
        notes += loop_notes(model.name, results, other.name, other_results)
        if compared["prompt_tokens"] != [p["tokens"] for p in prompt_list]:
            notes.append(f"{model.name} and {other.name} tokenize the prompts differently: each model's tok/s "
                         "counts its own tokens, so compare their speedups over their own depth 0, not their tok/s")
    vs_mlx, vs_mlx_detail = {}, {}
    if peers:
        for sampler in samplers:
            ours = next(c for c in configs if c.engine == "mtpnb" and c.depth == 0)
            theirs = next(c for c in configs if c.engine == "mlx-lm")
            pairs = [(decode_rate([a]), decode_rate([b]))
                     for rep_a, rep_b in zip(records[(ours, sampler)], records[(theirs, sampler)])
                     for a, b in zip(rep_a, rep_b)]
            detail = parity([a / b for a, b in pairs if a and b])
            vs_mlx[str(sampler.temperature)] = detail.get("ratio")
            vs_mlx_detail[str(sampler.temperature)] = detail
    notes += _notes(results, cost, blas, quick)

    data = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_best(results, temperatures),
        "depth0_vs_mlx_lm": vs_mlx,
        "depth0_vs_mlx_lm_detail": vs_mlx_detail,
        "model": model_info(model),
        "platform": platform_info(blas),
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
    if compared is not None:
        data["compare"] = compared
    if load_start is not None:  # a busy machine makes every figure noisier: say how busy it was
        data["platform"]["load_average"] = load_start
        data["platform"]["load_average_end"] = list(os.getloadavg())
    if progress:
        progress(total, total, "done")
    return BenchReport(json_safe(data))


def _prompt_list(model, prompts, count: int) -> list[dict]:
    if prompts is None:
        prompt_list = code_prompts(count, modules=heldout_modules(getattr(model, "path", None)))
    else:
        prompt_list = [dict(p) if isinstance(p, dict) else {"name": f"prompt {i}", "text": p}
                       for i, p in enumerate(prompts)]
    if not prompt_list:
        raise MTPNBError("no prompts")
    return prompt_list


def sampling_mode(temperature: float) -> str:
    """The cost model's key for a temperature's draft and acceptance costs."""
    return "greedy" if temperature == 0 else f"T={temperature}"


def _cost_model(model, encoded, samplers, max_depth, max_tokens, repeats) -> dict:
    """The cost model at a context as long as a prompt plus half the generation."""
    samplings = {sampling_mode(s.temperature): Sampling(**s.params()) for s in samplers}
    context_len = int(statistics.mean(len(e) for e in encoded)) + max_tokens // 2
    base = [t for e in encoded for t in e]
    context = (base * (context_len // len(base) + 1))[:context_len]
    return measure_costs(model, context, max(max_depth, 1) if model.has_mtp else max_depth, samplings,
                         repeats=repeats)


def _row(config: Config, sampler: Sampler, records: dict, cost: dict, profile: dict | None) -> dict:
    """One row of the results: a configuration at a temperature, over its repeats."""
    per_repeat = records[(config, sampler)]
    runs = [x for rep in per_repeat for x in rep]
    rates = [decode_rate(rep) for rep in per_repeat]
    base = next(c for (c, s) in records if s == sampler and c.engine == "mtpnb" and c.depth == 0
                and c.model is config.model)
    base_rates = [decode_rate(rep) for rep in records[(base, sampler)]]
    depth = config.depth
    row = {
        "engine": config.engine,
        "depth": depth,
        "temperature": sampler.temperature,
        "decode_tok_s": median(rates),
        "decode_tok_s_repeats": rates,
        "end_to_end_tok_s": median(end_to_end_rate(rep) for rep in per_repeat),
        "ttft_ms": median(x["ttft_s"] * 1e3 for x in runs),
        "generated_tokens": sum(x["tokens"] for x in runs),
        "runs": len(runs),
        "peak_memory_mb": max(x["peak_memory_mb"] for x in runs),
        "speedup": median(a / b for a, b in zip(rates, base_rates) if a and b),
        "loop_share": sum(x["loops"] for x in runs) / len(runs),
        **non_looping_speedup(per_repeat, records[(base, sampler)]),
    }
    if config.engine != "mtpnb":
        return row
    steps = [s for x in runs for s in x["result"].steps]
    verify = [s for s in steps if s.step > 0]
    row["verify_calls"] = len(verify)
    row["tokens_per_verify"] = (1 + sum(s.accepted for s in verify) / len(verify)) if verify else None
    row["tokens_per_verify_emitted"] = sum(s.emitted for s in verify) / len(verify) if verify else None
    row["acceptance_by_position"] = acceptance_by_position(steps, depth) if depth else []
    drafted = sum(s.drafted for s in verify)
    row["acceptance_rate"] = sum(s.accepted for s in verify) / drafted if depth and verify else None
    row["speedup_repeats"] = [a / b if a and b else None for a, b in zip(rates, base_rates)]
    verify_ratio = cost["verify_ratio"][depth] if depth < len(cost["verify_ratio"]) else None
    mode = sampling_mode(sampler.temperature)
    draft_ratio = cost["draft_ratio"].get(mode, 0.0) if depth else 0.0
    if verify_ratio is not None and row["tokens_per_verify"]:
        row["bound"] = speedup_bound(row["tokens_per_verify"], verify_ratio, draft_ratio, depth,
                                     cost.get("later_draft_ratio", {}).get(mode))
        row["fraction_of_bound"] = row["speedup"] / row["bound"] if row.get("speedup") and row["bound"] else None
    row["phases"] = profile or None
    return row


def _best(results: list[dict], temperatures: list[float]) -> dict:
    best = {}
    for label, selected in (("greedy", [t for t in temperatures if t == 0]),
                            ("sampled", [t for t in temperatures if t > 0])):
        for kind, key in (("", "speedup"), ("_non_looping", "speedup_non_looping")):
            candidates = [r for r in results if r["engine"] == "mtpnb" and r["depth"] > 0
                          and r["temperature"] in selected and r.get(key) is not None]
            top = max(candidates, key=lambda r: r[key], default=None)
            best[f"best_speedup{kind}_{label}"] = top[key] if top else None
            best[f"best_depth{kind}_{label}"] = top["depth"] if top else None
            if kind:  # how many runs of how many that figure rests on
                best[f"best_runs{kind}_{label}"] = [top["non_looping_runs"], top["runs"]] if top else None
            else:
                best[f"best_fraction_of_bound_{label}"] = top.get("fraction_of_bound") if top else None
    return best


def loop_notes(name: str, results: list[dict], other_name: str, other_results: list[dict]) -> list[str]:
    """A note for each temperature at which one model's completions loop far more often than the other's:
    its speedup there is largely its loops' (easy to draft), so the speedups on completions that do not
    loop are the ones to compare."""
    notes = []
    for t in sorted({r["temperature"] for r in results}):
        mine, theirs = _loop_share(results, t), _loop_share(other_results, t)
        if abs(mine - theirs) >= LOOP_SHARE_GAP:
            loopier = name if mine > theirs else other_name
            notes.append(f"at T={t} {100 * mine:.0f}% of {name}'s completions loop and {100 * theirs:.0f}% of "
                         f"{other_name}'s (an 8-token span 3+ times): a loop is easy to draft, so {loopier}'s "
                         "speedup there is largely its loops'; compare the speedups on completions that do not loop")
    return notes


def _loop_share(results: list[dict], temperature: float) -> float:
    """The share of a model's MTP completions at a temperature that loop, over all its depths."""
    rows = [r for r in results if r["engine"] == "mtpnb" and r["temperature"] == temperature]
    return sum(r["loop_share"] * r["runs"] for r in rows) / max(sum(r["runs"] for r in rows), 1)


def _notes(results: list[dict], cost: dict, blas: dict, quick: bool) -> list[str]:
    notes = ["mlx-lm's speculative decoding (stream_generate with draft_model=) needs a separate draft model; "
             "none applies to an MTP checkpoint, so it is not run."]
    if blas["kind"] == "reference":
        notes.append("MLX is on the reference BLAS: verifies cost ~linearly in tokens here; see the BLAS line.")
    bounds = [r for r in results if r["engine"] == "mtpnb" and r["depth"] and r.get("bound")]
    if bounds:
        top = max(bounds, key=lambda r: r["bound"])
        if top["bound"] < 1.5:
            mode = sampling_mode(top["temperature"])
            later = cost.get("later_draft_ratio", {}).get(mode)
            notes.append(
                f"The cost curve caps MTP here: the best bound is {top['bound']:.2f}x (depth {top['depth']}, "
                f"T={top['temperature']}, {top['tokens_per_verify']:.2f} tokens per verify against a verify of "
                f"{cost['verify_ratio'][top['depth']]:.2f} t_1 plus {top['depth']} draft steps of "
                f"{cost['draft_ratio'].get(mode, 0):.2f} t_1{f', the ones after the first {later:.2f}' if later else ''}).")
    if quick:
        notes.append("quick mode: few prompts and tokens, one repeat: the figures are indicative only.")
    return notes


def model_info(model) -> dict:
    try:
        info = model.info()
    except Exception:  # noqa: BLE001  (a report without model details beats no report)
        info = {"name": getattr(model, "name", "?")}
    return {k: info.get(k) for k in ("name", "path", "family", "parameters", "head_parameters", "layers",
                                     "linear_attention_layers", "hidden_size", "vocab_size", "has_mtp", "dtype",
                                     "quantization", "weights_mb", "device", "mtp_layers", "verify_kernels",
                                     "cpu_kernels")}


def platform_info(blas: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mlx": v("mlx"),
        "mlx_lm": v("mlx-lm") or v("mlx_lm"),
        "device": str(mx.default_device()),
        "blas": blas,
    }
