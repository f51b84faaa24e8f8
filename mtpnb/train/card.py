"""The model card (README.md) of a trained folder, rendered from training.json and evaluation.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..params import DRAFT_CONTEXT


def _losses(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _phase_rows(phases: list[dict]) -> list[str]:
    rows = [
        "| phase | trains | steps | tokens | wall | tokens/s | train loss: trunk | train loss: MTP steps 1..D |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        final = p["final_train"]
        trunk = f"{final['loss_main']:.3f}" if final.get("loss_main") is not None else "(frozen)"
        rows.append(
            f"| {p['name']} | {p['trains']} | {p['steps']} | {p['tokens'] / 1e6:.1f}M | {p['wall_s']:.0f} s "
            f"| {p['tokens_per_s'] / 1e3:.0f}k | {trunk} | {p['loss_kind']} {_losses(final['loss_mtp'])} |"
        )
    return rows


def _heldout_rows(named: list[tuple[str, dict]]) -> list[str]:
    rows = [
        "| measured after | tokens | trunk loss | perplexity | MTP loss, steps 1..D | agree with trunk, steps 1..D "
        "| chain, steps 1..D | tokens/verify (est.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in named:
        rows.append(
            f"| {name} | {m['tokens']} | {m['loss_main']:.3f} | {m['perplexity']:.2f} | {_losses(m['loss_mtp'])} "
            f"| {_losses(m['agree'])} | {_losses(m['chain'])} | {m['tokens_per_verify_estimate']:.2f} |"
        )
    return rows


def _engine_rows(engine: dict) -> list[str]:
    rows = [
        f"Measured with mtpnb's MLX engine on {engine['device']}: {engine['max_tokens']} tokens from each of the "
        "held-out prompts (`heldout_prompts`), depth "
        f"{engine['acceptance'][0]['depth']}. Acceptance per draft position is P(accepted | reached).",
        "",
        "| sampling | mean tokens per verify | acceptance per draft position |",
        "|---|---|---|",
    ]
    for a in engine["acceptance"]:
        if a["temperature"] == 0:
            sampling = "greedy"
        else:
            sampling = f"temperature {a['temperature']:g}, top_p {a['top_p']:g}, top_k {a['top_k']}"
        rows.append(f"| {sampling} | {a['mean_tokens_per_verify']:.2f} | {_losses(a['acceptance_by_position'])} |")
    rows += [
        "",
        "Decode speed, greedy, same process, one prompt (`def fibonacci(n):`); the figures depend on the "
        "machine and on what else runs on it:",
        "",
        "| depth | decode tok/s | end-to-end tok/s | tokens per verify |",
        "|---|---|---|---|",
    ]
    for d in engine["decode_speed"]:
        rows.append(
            f"| {d['depth']} | {d['decode_tok_s']:.1f} | {d['end_to_end_tok_s']:.1f} "
            f"| {d['mean_tokens_per_verify']:.2f} |"
        )
    return rows


def _corpus_lines(corpus: dict) -> list[str]:
    tokenizer = ("Tokenizer: byte-level BPE (`tokenizers`), special tokens `<|endoftext|>` (eos, also the file "
                 "separator), `<|im_start|>`, `<|im_end|>`; ChatML chat template.")
    if not corpus.get("heldout_packages"):  # a stdlib-only corpus
        return [
            f"Python {corpus['python']} standard library source: {corpus['train_files']} files, "
            f"{corpus['train_bytes'] / 1e6:.1f} MB, {corpus['train_tokens'] / 1e6:.2f}M tokens for training; "
            f"held out: {corpus['heldout_files']} files ({corpus['heldout_tokens'] / 1e3:.0f}k tokens), the modules "
            f"{', '.join(f'`{m}`' for m in corpus['heldout_modules'])}. The selection rules, every file and its "
            f"sha256 are in `manifest.json`. {tokenizer}"
        ]
    return [
        f"The Python {corpus['python']} standard library without its test suites, and the source of "
        f"{corpus['train_sources'] - 1} well-known permissively licensed (MIT, BSD, Apache-2.0) pure-Python packages "
        "from PyPI (`pip download --no-deps`, pinned): no tests, no vendored code, exact and near-duplicate files "
        f"removed. **{corpus['train_tokens'] / 1e6:.1f}M distinct training tokens** ({corpus['train_files']} files, "
        f"{corpus['train_bytes'] / 1e6:.0f} MB).",
        "",
        "No package that `pip install mtpnb[test]` brings in (its requirements and theirs) is trained on: that is "
        "the code users have open beside the notebook, and the held-out text is whole packages of it: "
        f"{', '.join(f'`{m}`' for m in corpus['heldout_packages'])}, with the standard library modules "
        f"{', '.join(f'`{m}`' for m in corpus['heldout_modules'])} (`mtpnb bench` prompts from them); "
        f"{corpus['heldout_files']} files, {corpus['heldout_tokens'] / 1e6:.2f}M tokens. `manifest.json` has the "
        "rules, every package with its version, licence, file count, tokens and sha256, the closure left out, "
        f"and every held-out file. {tokenizer}",
    ]


def _cpu_kernels_line(status: dict) -> str:
    if status["enabled"]:
        return f" mtpnb's CPU verify kernels (mtpnb.cpu_kernels) on, {status['threads']} threads."
    return f" mtpnb's CPU verify kernels off: {status['reason']}."


def _shape_rows(shapes: dict) -> list[str]:
    acceptance = shapes["acceptance"]
    rows = [
        f"Candidate shapes with untrained weights (`python -m mtpnb.train.shapes`; bf16 on disk, float32 MLX on "
        f"this 2-core CPU with OpenBLAS, warm caches at {shapes['context_tokens']} tokens of context; the fastest "
        f"of {shapes['repeats']} interleaved repeats, the least disturbed; 1-minute load average after each repeat, "
        f"the measurement's own included: {', '.join(f'{v:.1f}' for v in shapes['load_average_1min'])}). The bound is "
        "E[tokens per verify] / (t_verify(D+1)/t_1 + D t_draft/t_1) at a per-position acceptance of "
        f"{' / '.join(f'{a:.2f}' for a in acceptance['greedy'])} (greedy) and "
        f"{' / '.join(f'{a:.2f}' for a in acceptance['sampled'])} (T=0.6), {acceptance['source']}. "
        f"BLAS: {shapes['blas']['message'].removeprefix('BLAS: ')}."
        + (_cpu_kernels_line(shapes["cpu_kernels"]) if "cpu_kernels" in shapes else ""),
        "",
        "| shape | parameters | on disk | t_1 | plain decoding | t_verify(M)/t_1, M = 1..5 | draft step / t_1 "
        "| bound greedy, D = 3 / 4 | bound T=0.6, D = 3 / 4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in shapes["candidates"]:
        bg, bs = c["bound"]["greedy"], c["bound"]["sampled"]
        name = f"{c['name']} ({c['shipped_as']})" if c.get("shipped_as") else c["name"]
        rows.append(
            f"| {name} | {c['parameters']['total'] / 1e6:.1f}M | {c['weights_mb']:.1f} MB | {c['t1_ms']:.1f} ms "
            f"| {c['plain_tok_s']:.1f} tok/s | {' / '.join(f'{v:.2f}' for v in c['verify_ratio'])} "
            f"| {c['draft_ratio']['greedy']:.2f} | {bg['3']:.2f} / {bg['4']:.2f} | {bs['3']:.2f} / {bs['4']:.2f} |"
        )
    if shapes.get("conclusion"):  # what the table says about the choice, written by whoever ran it
        rows += ["", shapes["conclusion"]]
    return rows


def _quality_rows(quality: dict) -> list[str]:
    labels = list(quality)
    rows = [
        "`python -m mtpnb.train.quality` (definitions in its docstring): the same held-out tokens and the same "
        f"{quality[labels[0]]['prompts']} function-header prompts (signature + docstring, a few lines before) from "
        "the held-out packages for every model; 128 tokens per completion with mtpnb's engine (float32); loop = "
        "some 8-token span 3+ times; parse = the first function body parses; tokens per verify and acceptance per "
        "draft position (P(accepted | reached)) pooled over the completions (depth 3: all prompts; depths 1, 2, 4: "
        "the first prompts).",
        "",
        "| model | held-out perplexity | sampling | loop rate | parse rate | tokens/verify, depth 1 / 2 / 3 / 4 "
        "| depth 3, non-looping | acceptance by position, depth 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        q = quality[label]
        ppl = f"{q['heldout']['perplexity']:.2f} ({q['heldout']['tokens']} tokens)" if "heldout" in q else "not measured"
        for mode in ("greedy", "T=0.6"):
            if mode not in q:
                rows.append(f"| {label} | {ppl} | {mode} | not measured | | | | |")
                continue
            m = q[mode]
            depths = m["depths"]
            tpv = " / ".join(f"{depths[d]['tokens_per_verify']:.2f}" for d in ("1", "2", "3", "4") if d in depths)
            acc = " / ".join(f"{a:.2f}" for a in depths.get("4", {}).get("acceptance_by_position", []) if a is not None)
            non_looping = depths["3"]["non_looping"]
            nl_tpv = non_looping["tokens_per_verify"]
            rows.append(
                f"| {label} | {ppl} | {mode} "
                f"| {m['loop_rate']:.0%} | {m['parse_rate']:.0%} | {tpv} "
                f"| {'-' if nl_tpv is None else f'{nl_tpv:.2f}'} ({non_looping['completions']}) | {acc} |"
            )
    for label in (label for label in labels if "examples" in quality[label]):
        rows += ["", f"Five uncurated greedy completions of `{label}` (the first five prompts, depth 3):", ""]
        for ex in quality[label]["examples"]:
            header = ex["prompt"].splitlines()
            rows += [f"`{ex['name']}`:", "", "```python", *header[-6:], ex["completion"].rstrip("\n"), "```", ""]
    return rows


def _prefix_lengths(hp: dict) -> str:
    """The own continuations' prefix lengths as the card says them: "128 tokens", or "128, 256 or 512
    tokens (in turn)" (a run before several lengths recorded one number)."""
    lengths = hp["unlikelihood_prefix"]
    if isinstance(lengths, int) or len(lengths) == 1:
        return f"{lengths if isinstance(lengths, int) else lengths[0]} tokens"
    return f"{', '.join(map(str, lengths[:-1]))} or {lengths[-1]} tokens (in turn)"


def _subset_description(subset: dict | None) -> str:
    if subset is None:
        return ""
    return (f" ({subset['files']} of its {subset['of_files']} files, drawn at random with seed {subset['seed']}: "
            "`python -m mtpnb.train.corpus --subset-of`)")


def _phase_description(phase: dict, hp: dict) -> str:
    """What a phase trained, with the hyper-parameters of the run it belonged to."""
    if phase["name"] == "joint":
        return (
            f"**joint** (peak lr {hp['lr']:g}, {hp['warmup_steps']} warm-up steps): "
            f"`L = L_main + {hp['mtp_lambda']:g} * sum_k a_k L_k`, k = 1..{hp['depth']}, "
            f"a_k = {_losses(hp['mtp_alpha'])} (proportional to {hp['mtp_decay']:g}^(k-1): a draft at position "
            "k is only worth anything when the k-1 before it were accepted). Each L_k is the cross-entropy of "
            "head step k against the real token, teacher-forced on the real tokens."
        )
    if phase["name"] == "unlikelihood":
        where = (" that end where a function's body starts (after its docstring)"
                 if hp.get("own_prefixes") == "function-body"
                 else " that end where a function's body starts (after its docstring) or after a `def` line"
                 if hp.get("own_prefixes") == "function" else "")
        how = ("at T=0.6" if hp.get("unlikelihood_sampled_only")
               else "greedily and at T=0.6 in turn" if hp.get("unlikelihood_sampled") else "greedily")
        repeats = ("in the third or a later occurrence of an 8-token span within that continuation (code writes "
                   "many spans twice; the quality evaluation counts a loop from the third)"
                   if hp.get("unlikelihood_occurrence", 2) == 3
                   else "in an 8-token span repeated within that continuation")
        return (
            f"**unlikelihood** (peak lr {hp['unlikelihood_lr']:g}): a small model's greedy decoding falls into "
            "loops, so, as in sequence-level unlikelihood training (Welleck et al. 2019), the model continues "
            f"{hp['unlikelihood_pool']} random prefixes of {_prefix_lengths(hp)} of the training text"
            f"{where} {how} for {hp['unlikelihood_continuation']} tokens at a time, from its current weights, and "
            f"`L = L_joint + {hp['unlikelihood_beta']:g} * mean_t -log(1 - p(x_t | x_<t))` over the "
            f"continuation tokens x_t that lie {repeats}. The joint loss on real text keeps the rest of the "
            "distribution in place."
        )
    return (
        f"**head** (peak lr {hp['head_lr']:g}): trunk, embeddings and lm_head frozen; "
        "`sum_k a_k KL(p_trunk(. | x[..t+k]) || q_k)`, the head fitted to the trunk's own next-token "
        "distribution, which is what speculative acceptance rewards"
        + (f"; on real text and, in equal measure, on the model's own {hp['unlikelihood_continuation']}-token "
           f"continuations of prefixes of {_prefix_lengths(hp)} (greedy and at T=0.6 in turn, "
           f"{hp['unlikelihood_pool']} at a time), the text it drafts in use."
           if hp.get("head_data") == "own" else ".")
    )


def _run_steps(run: dict, first: bool) -> list[str]:
    """What one run did, a numbered step each: its phases, then the interpolation export made of it."""
    steps = [
        _phase_description(p, run["hyperparameters"])
        + (f" Fine-tuning from the weights above on {run['train_tokens'] / 1e6:.1f}M tokens drawn from the "
           f"training split{_subset_description(run['corpus'].get('subset'))}."
           if not first and p is run["phases"][0] and run.get("train_tokens") else "")
        for p in run["phases"]
    ]
    if "interpolation" in run:
        weight = run["interpolation"]["weight"]
        steps.append(f"The weights {weight:g} of the way from where this fine-tune started to where it ended "
                     f"(start + {weight:g} x (end - start), tensor by tensor: "
                     "`python -m mtpnb.train.export --base --weight`).")
    return steps


def _reproduce_run(r: int, runs: list[dict]) -> list[str]:
    """The Reproduce section's commands for run r (into _out(r, runs))."""
    run = runs[r]
    out = _out(r, runs)
    train_out = f"{out}-full" if "interpolation" in run else out
    subset = run["corpus"].get("subset")
    data = f"artifacts/subset{r + 1}" if subset else "artifacts/corpus"
    lines = [f"python -m mtpnb.train.corpus {data} --subset-of artifacts/corpus --tokens {subset['tokens']} "
             f"--seed {subset['seed']}"] if subset else []
    lines.append(f"python -m mtpnb.train --data {data} --out {train_out} {run['hyperparameters']['command_line']}"
                 + (f" --init-from {_out(r - 1, runs)}" if r else ""))
    if "interpolation" in run:
        lines.append(f"python -m mtpnb.train.export {train_out} {out} --base {_out(r - 1, runs)} "
                     f"--weight {run['interpolation']['weight']:g}")
    return lines


def _lineage(training: dict) -> list[dict]:
    """The runs that made the model, oldest first (a fine-tuning run records the run it started from)."""
    runs = [training]
    while runs[0].get("base"):
        runs.insert(0, runs[0]["base"])
    return runs


def _out(r: int, runs: list[dict]) -> str:
    return "OUT" if len(runs) == 1 else f"OUT{r + 1}"


def render_card(training: dict, evaluation: dict | None, draft_vocab: dict | None = None) -> str:
    """The model card from training.json, evaluation.json and draft_vocab.json (each as loaded)."""
    runs = _lineage(training)
    first = runs[0]
    hp, corpus, model = first["hyperparameters"], first["corpus"], training["model"]
    phases = [p for run in runs for p in run["phases"]]
    measured = [(p["name"], p["heldout"]) for p in phases]
    if evaluation and "loss_main" in evaluation:
        measured.append((f"`evaluate` (Python {evaluation['python']}, float32)", evaluation))
    cfg = model["config"]
    steps = [
        f"{i}. {step}"
        for i, step in enumerate((step for run in runs for step in _run_steps(run, first=run is first)), start=1)
    ]
    runs_line = " ".join(
        f"{'Then' if run is not first else ''} {run['hardware']['device']}, torch {run['hardware']['torch']}, "
        f"transformers {run['hardware']['transformers']}, Python {run['hardware']['python']}: {run['wall_s']:.0f} s "
        f"({', '.join(p['name'] for p in run['phases'])}; batch {run['hyperparameters']['batch_size']})." for run in runs).strip()
    lines = [
        "# mtpnb default model",
        "",
        "A small Qwen3.5-format code model with one multi-token-prediction (MTP) layer, trained by mtpnb on",
        "permissively licensed Python source, so that mtpnb's notebooks, demos and tests have a model whose",
        "MTP head really predicts. It continues Python code; it is not an assistant and follows no instructions.",
        "",
        "## Model",
        "",
        f"- `Qwen3_5ForCausalLM` (model_type `qwen3_5_text`): {model['parameters']['trunk'] / 1e6:.2f}M trunk "
        f"parameters + {model['parameters']['mtp'] / 1e6:.2f}M MTP head, tied embeddings, vocabulary {cfg['vocab_size']}.",
        f"- Trunk: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, gated full attention every "
        f"{cfg['full_attention_interval']}th layer ({cfg['num_attention_heads']} heads x {cfg['head_dim']}, "
        f"{cfg['num_key_value_heads']} KV heads, partial rotary 0.25), Gated DeltaNet elsewhere "
        f"({cfg['linear_num_key_heads']} key / {cfg['linear_num_value_heads']} value heads of "
        f"{cfg['linear_key_head_dim']}), MLP {cfg['intermediate_size']}.",
        "- MTP head (`mtp.*`, 15 tensors, `mtp_num_hidden_layers: 1`): `g = norm(layer(fc([norm_e(embed(x[t+1])),"
        " norm_h(h[t])])))`, logits through the shared lm_head; step k >= 2 feeds the previous step's `g` back"
        " with the next token.",
        *([f"- Draft vocabulary (`draft_vocab.json`): the head drafts from {draft_vocab['source']}, and from up "
           f"to {draft_vocab.get('context', DRAFT_CONTEXT)} tokens of a generation's own context (its prompt, then "
           "what it commits) outside them; a draft step computes only those rows of lm_head "
           "(`python -m mtpnb.train.draft_vocab` says how the size was chosen; `mtpnb.model.DraftVocabulary`)."]
          if draft_vocab else []),
        f"- Weights in {training['hyperparameters']['export_dtype']} (`A_log` in float32).",
        "",
        "## Corpus",
        "",
        *_corpus_lines(corpus),
        "",
        "## Training",
        "",
        f"Seed {hp['seed']}. {runs_line} {sum(run['wall_s'] for run in runs):.0f} s of training in all. Random "
        f"windows of {hp['seq_len']} + {hp['depth']} + 1 tokens, "
        f"{'bf16 autocast' if hp['autocast'] else 'float32'}, AdamW (betas 0.9/0.95, weight decay "
        f"{hp['weight_decay']} on matrices and embeddings), gradient clip {hp['grad_clip']}, linear warm-up then "
        f"cosine decay to {hp['min_lr_ratio']:g} x the peak.",
        "",
        *steps,
        "",
        *_phase_rows(phases),
        "",
        "## Evaluation on the held-out text",
        "",
        "Teacher-forced over non-overlapping windows: `agree` is how often head step k's top-1 equals the "
        "trunk's own greedy token at that position, `chain` how often steps 1..k all do; "
        "`1 + sum(chain)` estimates greedy tokens per verify step at depth D. The phase rows were measured "
        "at the end of each training phase (bf16 autocast on the training device) on the first held-out "
        "windows; the `evaluate` row in float32 on this machine, over the manifest's held-out files in order.",
        "",
        *_heldout_rows(measured),
    ]
    curve = []
    for r, run in enumerate(runs):
        order = [p["name"] for p in run["phases"]]
        points = [h for h in run["history"] if "heldout" in h]
        points += [{"phase": p["name"], "step": p["steps"], "heldout": p["heldout"]} for p in run["phases"]]
        curve += sorted(points, key=lambda h: (order.index(h["phase"]), h["step"]))
    if len(curve) > len(phases):
        lines += [
            "",
            "During training (a held-out trunk loss that rises again while the training loss falls is overfitting):",
            "",
            "| phase | step | held-out trunk loss | tokens/verify (est.) |",
            "|---|---|---|---|",
            *(
                f"| {h['phase']} | {h['step']} | {h['heldout']['loss_main']:.3f} "
                f"| {h['heldout']['tokens_per_verify_estimate']:.2f} |"
                for h in curve
            ),
        ]
    if evaluation and evaluation.get("completions"):
        lines += [
            "",
            "Greedy completions (trunk alone, `python -m mtpnb.train.evaluate`):",
            "",
        ]
        for prompt, text in evaluation["completions"].items():
            lines += [f"Prompt `{prompt!r}`:", "", "```python", text, "```", ""]
    if evaluation:
        if "engine" in evaluation:
            lines += ["## Speculative decoding with the MLX engine", "", *_engine_rows(evaluation["engine"]), ""]
        if "perplexity_beside_previous" in evaluation:
            ppl = evaluation["perplexity_beside_previous"]
            lines += ["## Held-out perplexity beside the previous model", "", ppl["how"], "",
                      "| model | tokens | loss per token | perplexity |", "|---|---|---|---|",
                      *(f"| {label} | {m['tokens']} | {m['loss']:.3f} | {m['perplexity']:.2f} |"
                        for label, m in ppl["models"].items()), ""]
        if "quality" in evaluation:
            lines += ["## Quality on the held-out packages, beside the previous model", "",
                      *_quality_rows(evaluation["quality"]), ""]
            # what the table alone does not say (sampling error, what changed between rows), by whoever ran it
            lines += [note for text in evaluation.get("quality_notes", []) for note in (text, "")]
        if "shapes" in evaluation:
            lines += ["## Why this shape", "", *_shape_rows(evaluation["shapes"]), ""]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "python -m mtpnb.train.corpus artifacts/corpus        # corpus, tokenizer, token arrays",
        *(line for r in range(len(runs)) for line in _reproduce_run(r, runs)),
        *([f"python -m mtpnb.train.draft_vocab artifacts/corpus {_out(len(runs) - 1, runs)} "
           f"--size {len(draft_vocab['ids'])}"] if draft_vocab else []),
        f"python -m mtpnb.train.evaluate {_out(len(runs) - 1, runs)} --write",
        "```",
        "",
        "`training.json` holds every hyper-parameter and the loss history.",
        "",
    ]
    return "\n".join(lines)


def write_card(model_dir: Path) -> None:
    model_dir = Path(model_dir)
    training = json.loads((model_dir / "training.json").read_text())
    evaluation_path = model_dir / "evaluation.json"
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else None
    vocab_path = model_dir / "draft_vocab.json"
    draft_vocab = json.loads(vocab_path.read_text()) if vocab_path.exists() else None
    (model_dir / "README.md").write_text(render_card(training, evaluation, draft_vocab))
