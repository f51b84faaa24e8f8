"""Verify cost curve t(M)/t(1), M = 1..5, of a Qwen3.6-35B-A3B-shaped random MoE model, 4-bit: stock MLX
vs mtpnb's verify kernels where they apply (the quantized attention, Gated DeltaNet, shared-expert and
router linears and the lm_head; the routed experts always run MLX's gather_qmm, see mtpnb/kernels.py).

Why: a verify of M tokens routes each row to its own top-8 experts, so it reads up to M times the expert
weights one token reads; the curve of an MoE model differs from a dense one's and decides the best depth
(on the peer runtime Qwen3.6-35B-A3B is fastest at depth 1). Also timed: one draft step of the MTP head
(its own MoE layer and the lm_head over the whole vocabulary), as a fraction of t(1).

The shape (SHAPE_35B_A3B) is Qwen3.5/3.6-35B-A3B's text config: hidden 2048, 40 layers with gated full
attention every 4th (16 query heads of 256, 2 KV heads, rotary on 25%), Gated DeltaNet 16 key / 32 value
heads of 128 with a conv of 4, 256 routed experts of 512 with top 8 plus one shared expert of 512 and its
gate, vocabulary 248320, untied lm_head, one MTP layer. Checked against third-party copies of the
published config.json and the Hugging Face architecture overview (benchmarks/kernels/NOTES.md says which).

On the lent H200 (MLX's CUDA backend; one command, well under 8 minutes; the JSON is rewritten after every
curve, so a run cut short keeps what it measured):

    python3 benchmarks/moe_verify_curve.py --out-dir $OUT

On any machine, a small model of the same structure (seconds, CPU): `--tiny`. `--layers N` keeps N of the
40 layers (the ratios of a stack of identical layer groups barely depend on N; t(1) scales with it).
Weights are random (nothing is downloaded): timings depend on shapes and bits, not values; tokens are
random, so rows route to distinct experts about as often as independent draws would (real text shares
a few more). The model is built layer by layer, each quantized before the next is made, so the float
weights of the whole model are never held at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

SHAPE_35B_A3B = dict(
    model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40, full_attention_interval=4,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, intermediate_size=512,
    num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, vocab_size=248320, rms_norm_eps=1e-6, tie_word_embeddings=False,
    mtp_num_hidden_layers=1,
    rope_parameters={"type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
)
TINY = dict(SHAPE_35B_A3B, hidden_size=128, num_hidden_layers=4, head_dim=32, num_attention_heads=4,
            num_experts=16, moe_intermediate_size=64, shared_expert_intermediate_size=64, intermediate_size=64,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
            vocab_size=1024)


def build(shape: dict, bits: int, group_size: int, dtype):
    """mlx-lm's Qwen3.5 MoE trunk and mtpnb's MTP head, random, quantized as `mtpnb.load(quantize=)` does."""
    from mlx_lm.models import qwen3_5_moe

    from mtpnb import rollback
    from mtpnb.head import MTPHead, head_args
    from mtpnb.model import Model

    trunk = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(dict(shape)))
    rule = trunk.quant_predicate  # routers and shared-expert gates at 8 bits, as mlx-lm converts

    def quantize(module, prefix):
        module.set_dtype(dtype)
        nn.quantize(module, group_size, bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % group_size == 0 and rule(f"{prefix}.{p}", m))
        mx.eval(module.parameters())

    inner = trunk.language_model.model
    for i, layer in enumerate(inner.layers):
        quantize(layer, f"language_model.model.layers.{i}")
    quantize(inner.embed_tokens, "language_model.model.embed_tokens")
    quantize(trunk.language_model.lm_head, "language_model.lm_head")
    inner.norm.set_dtype(dtype)
    head = MTPHead(head_args(shape))
    quantize(head, "mtp")
    rollback.install(trunk)
    return Model(trunk=trunk, head=head, tokenizer=None, config={"text_config": shape}, path=None,
                 name="35B-A3B-shaped")


def weight_bytes(model) -> dict:
    """What one token's forward reads at least: every weight but the embedding table (one row of it)
    and the routed experts (top-k of them per layer), then those top-k experts."""
    from mlx.utils import tree_flatten

    shape = model.text_config
    total = experts = embedding = 0
    for name, v in tree_flatten(model.trunk.parameters()):
        total += v.nbytes
        if ".switch_mlp." in name:
            experts += v.nbytes
        elif "embed_tokens" in name:
            embedding += v.nbytes
    per_token_experts = experts * shape["num_experts_per_tok"] / shape["num_experts"]
    return {"trunk_gb": total / 1e9, "routed_experts_gb": experts / 1e9,
            "read_per_token_gb": (total - experts - embedding + per_token_experts) / 1e9}


def timed(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):  # kernel compilation for this shape (MLX's CUDA backend JIT-compiles)
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def curve(model, context: int, max_m: int, warmup: int, repeats: int, record: dict, save, deadline: float):
    """Median ms of a trunk forward (logits included) of M tokens after `context` tokens, M = 1..max_m,
    each rolled back, then of one MTP head draft step (head layer + lm_head, trimmed), into `record`
    (saved after each figure). Past `deadline` (perf_counter) the rest is skipped and `cut_short` set."""
    from mtpnb.rollback import rollback_cache

    vocab = model.text_config["vocab_size"]
    cache, head_cache = model.make_cache(), model.make_head_cache()
    prompt = mx.random.randint(0, vocab, (1, context))
    hidden, _ = model.forward(prompt, cache=cache)
    g, _ = model.mtp_forward(hidden[:, :-1], prompt[:, 1:], cache=head_cache)
    mx.eval(hidden, g, head_cache.state)
    record.update(verify_ms=[], ratio=[], cut_short=False)
    for m in range(1, max_m + 1):
        if time.perf_counter() > deadline:
            record["cut_short"] = True
            save()
            return
        ids = mx.random.randint(0, vocab, (1, m))

        def forward():
            mx.eval(model.forward(ids, cache=cache))
            rollback_cache(cache, keep=0, discard=m)

        record["verify_ms"].append(timed(forward, warmup, repeats))
        record["t1_ms"] = record["verify_ms"][0]
        record["ratio"] = [t / record["t1_ms"] for t in record["verify_ms"]]
        save()
    token = prompt[:, -1:]

    def draft_step():
        mx.eval(model.mtp_forward(g[:, -1:], token, cache=head_cache, step=1))
        head_cache.trim(1)

    if time.perf_counter() > deadline:
        record["cut_short"] = True
    else:
        record["draft_step_ms"] = timed(draft_step, warmup, repeats)
        record["draft_ratio"] = record["draft_step_ms"] / record["t1_ms"]
    save()


def markdown(result: dict) -> str:
    s = result["settings"]
    w = result["weights"]
    lines = [
        f"{result['model']} ({s['layers']} layers{', tiny' if s['tiny'] else ''}), {s['bits']}-bit g{s['group_size']} "
        f"{s['dtype']}, context {s['context']}, {result['device']}, mlx {result['mlx']}, median of {s['repeats']}: "
        f"trunk {w['trunk_gb']:.3g} GB, read per token >= {w['read_per_token_gb']:.3g} GB "
        f"(routed experts {w['routed_experts_gb']:.3g} GB in all)",
        "",
        "| | t(1) ms | " + " | ".join(f"M={m}" for m in range(1, s["max_m"] + 1)) + " | draft step / t(1) |",
        "|---|---|" + "---|" * s["max_m"] + "---|",
    ]
    for label, c in result["curves"].items():
        if not c.get("verify_ms"):
            lines.append(f"| {label} | not measured within --budget-s |" + " |" * (s["max_m"] + 1))
            continue
        ratios = [f"{r:.2f}" for r in c["ratio"]] + ["-"] * (s["max_m"] - len(c["ratio"]))
        draft = f"{c['draft_ratio']:.2f}" if "draft_ratio" in c else "-"
        lines.append(f"| {label} | {c['t1_ms']:.2f} | " + " | ".join(ratios) + f" | {draft} |"
                     + (" (cut short by --budget-s)" if c.get("cut_short") else ""))
    if result.get("switched"):
        lines.append("")
        lines.append(f"verify kernels {result['switched']}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small model of the same structure (CPU, seconds)")
    parser.add_argument("--layers", type=int, help="keep this many layers (default: all 40, or 4 with --tiny)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="float weights and activations (default bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    parser.add_argument("--max-m", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--stock-only", action="store_true", help="skip the verify-kernel curve")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="stop measuring after this many seconds from the start, keeping what is measured "
                             "(the lent GPU allows 8 minutes a command)")
    parser.add_argument("--out-dir", help="write moe_verify_curve.json and .md here (after every curve)")
    args = parser.parse_args(argv)

    from mtpnb.kernels import kernel_status

    shape = dict(TINY if args.tiny else SHAPE_35B_A3B)
    if args.layers:
        if args.layers % shape["full_attention_interval"]:
            sys.exit(f"--layers must be a multiple of {shape['full_attention_interval']} (one full-attention layer per group)")
        shape["num_hidden_layers"] = args.layers
    dtype = args.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16")
    mx.random.seed(0)
    started = time.perf_counter()
    deadline = started + args.budget_s
    model = build(shape, args.bits, args.group_size, getattr(mx, dtype))
    result = {
        "model": model.name, "device": str(mx.default_device()), "mlx": mx.__version__, "shape": shape,
        "settings": {**vars(args), "dtype": dtype, "layers": shape["num_hidden_layers"]},
        "weights": weight_bytes(model), "build_s": time.perf_counter() - started, "curves": {},
    }
    out = Path(args.out_dir) if args.out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def write():
        if out:
            (out / "moe_verify_curve.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
            (out / "moe_verify_curve.md").write_text(markdown(result))

    print(f"built in {result['build_s']:.0f} s: {result['weights']}", flush=True)
    runs = [("stock MLX", False)] + ([] if args.stock_only else [("verify kernels", True)])
    for label, kernels in runs:
        t = time.perf_counter()
        model.use_verify_kernels(kernels)
        if kernels:
            result["switched"] = model.info()["verify_kernels"]
            result["kernel_checks"] = {str(k): v for k, v in kernel_status()["checks"].items()}
        c = result["curves"][label] = {}
        curve(model, args.context, args.max_m, args.warmup, args.repeats, c, write, deadline)
        c["wall_s"] = time.perf_counter() - t
        write()
        print(f"{label}: t(M)/t(1) " + " ".join(f"{r:.2f}" for r in c["ratio"])
              + (f", t(1) {c['t1_ms']:.2f} ms" if c["ratio"] else "")
              + (f", draft step {c['draft_ratio']:.2f} t(1)" if "draft_ratio" in c else "")
              + f" ({c['wall_s']:.0f} s{', cut short' if c['cut_short'] else ''})", flush=True)
    model.use_verify_kernels(False)
    print()
    print(markdown(result))
    write()


if __name__ == "__main__":
    main()
