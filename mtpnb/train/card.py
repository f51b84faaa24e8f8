"""The model card (README.md) of a trained folder, rendered from training.json and evaluation.json."""

from __future__ import annotations

import json
from pathlib import Path


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


def render_card(training: dict, evaluation: dict | None) -> str:
    hp, corpus, hw, model = training["hyperparameters"], training["corpus"], training["hardware"], training["model"]
    measured = [(p["name"], p["heldout"]) for p in training["phases"]]
    if evaluation:
        measured.append((f"`evaluate` (Python {evaluation['python']}, float32)", evaluation))
    cfg = model["config"]
    lines = [
        "# mtpnb default model",
        "",
        "A small Qwen3.5-format code model with one multi-token-prediction (MTP) layer, trained by mtpnb on",
        "the Python standard library's own source, so that mtpnb's notebooks, demos and tests have a model",
        "whose MTP head really predicts. It writes plausible Python; it is not a useful assistant.",
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
        f"- Weights in {hp['export_dtype']} (`A_log` in float32).",
        "",
        "## Corpus",
        "",
        f"Python {corpus['python']} standard library source: {corpus['train_files']} files, "
        f"{corpus['train_bytes'] / 1e6:.1f} MB, {corpus['train_tokens'] / 1e6:.2f}M tokens for training; "
        f"held out: {corpus['heldout_files']} files ({corpus['heldout_tokens'] / 1e3:.0f}k tokens), the modules "
        f"{', '.join(f'`{m}`' for m in corpus['heldout_modules'])} and their tests. The selection rules, every "
        "file and its sha256 are in `manifest.json`. Tokenizer: byte-level BPE trained on the training files "
        "(`tokenizers`), special tokens `<|endoftext|>` (eos, also the file separator), `<|im_start|>`, "
        "`<|im_end|>`; ChatML chat template.",
        "",
        "## Training",
        "",
        f"Seed {hp['seed']}. {hw['device']}, torch {hw['torch']}, transformers {hw['transformers']}, "
        f"Python {hw['python']}; {training['wall_s']:.0f} s of training in all. Random windows of "
        f"{hp['seq_len']} + {hp['depth']} + 1 tokens, batch {hp['batch_size']}, "
        f"{'bf16 autocast' if hp['autocast'] else 'float32'}, AdamW (betas 0.9/0.95, weight decay "
        f"{hp['weight_decay']} on matrices and embeddings), gradient clip {hp['grad_clip']}, linear warm-up then "
        f"cosine decay to {hp['min_lr_ratio']:g} x the peak.",
        "",
        f"1. **joint** (peak lr {hp['lr']:g}, {hp['warmup_steps']} warm-up steps): "
        f"`L = L_main + {hp['mtp_lambda']:g} * sum_k a_k L_k`, k = 1..{hp['depth']}, "
        f"a_k = {_losses(hp['mtp_alpha'])} (proportional to {hp['mtp_decay']:g}^(k-1): a draft at position "
        "k is only worth anything when the k-1 before it were accepted). Each L_k is the cross-entropy of "
        "head step k against the real token, teacher-forced on the real tokens.",
        f"2. **head** (peak lr {hp['head_lr']:g}): trunk, embeddings and lm_head frozen; "
        "`sum_k a_k KL(p_trunk(. | x[..t+k]) || q_k)`, the head fitted to the trunk's own next-token "
        "distribution, which is what speculative acceptance rewards.",
        "",
        *_phase_rows(training["phases"]),
        "",
        "## Evaluation on the held-out modules",
        "",
        "Teacher-forced over non-overlapping windows: `agree` is how often head step k's top-1 equals the "
        "trunk's own greedy token at that position, `chain` how often steps 1..k all do; "
        "`1 + sum(chain)` estimates greedy tokens per verify step at depth D. The phase rows were measured "
        "at the end of each training phase (bf16 autocast on the training device); the held-out text is the "
        "modules first, then their tests.",
        "",
        *_heldout_rows(measured),
    ]
    curve = [h for h in training["history"] if "heldout" in h]
    curve += [{"phase": p["name"], "step": p["steps"], "heldout": p["heldout"]} for p in training["phases"]]
    if len(curve) > len(training["phases"]):
        curve.sort(key=lambda h: ([p["name"] for p in training["phases"]].index(h["phase"]), h["step"]))
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
    if evaluation:
        lines += [
            "",
            "Greedy completions (trunk alone, `python -m mtpnb.train.evaluate`):",
            "",
        ]
        for prompt, text in evaluation["completions"].items():
            lines += [f"Prompt `{prompt!r}`:", "", "```python", text, "```", ""]
        if "engine" in evaluation:
            lines += ["## Speculative decoding with the MLX engine", "", *_engine_rows(evaluation["engine"]), ""]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "python -m mtpnb.train.corpus artifacts/corpus        # corpus, tokenizer, token arrays",
        f"python -m mtpnb.train --data artifacts/corpus --out OUT {hp['command_line']}",
        "python -m mtpnb.train.evaluate OUT --write",
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
    (model_dir / "README.md").write_text(render_card(training, evaluation))
