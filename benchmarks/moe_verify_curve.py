"""Verify cost curve t(M)/t(1), M = 1..5, of a Qwen3.6-35B-A3B-shaped random MoE model, 4-bit: stock MLX
vs mtpnb's verify kernels (the quantized attention / shared-expert / router linears; the routed experts
keep MLX's gather_qmm, which reads each selected expert once per row group).

Why: a verify of M tokens routes each row to its own top-k experts, so it reads up to M times the
expert weights one token reads; the curve of an MoE model differs from a dense one's and decides the
best depth (on the peer runtime Qwen3.6-35B-A3B is fastest at depth 1). Written for the lent H200
(MLX's CUDA backend):

    export PYTHONPATH=$PWD && python3 benchmarks/moe_verify_curve.py --out kernels/results/h200_moe_curve.txt

and `--tiny` for a shape check on any machine (seconds, CPU). Weights are random (nothing is
downloaded): timings depend on shapes and bits, not values. The model is built layer by layer and each
layer quantized before the next is made, so the float weights of the whole model are never held at once.

NOT RUN yet (written without device time): its figures belong in kernels/NOTES.md once measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

# Qwen3.5/3.6-35B-A3B's text config as recalled from its config.json (hidden 2048, 40 layers with full
# attention every 4th, 256 experts of 512, top 8, a shared expert of 512, gated attention 16 x 256 with 2
# KV heads, Gated DeltaNet 16 key / 32 value heads of 128): check it against the published config.json
# before quoting figures.
SHAPE_35B_A3B = dict(
    model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40, full_attention_interval=4,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, intermediate_size=512,
    num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, vocab_size=248320, rms_norm_eps=1e-6, tie_word_embeddings=False,
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
    return Model(trunk=trunk, head=head, tokenizer=None, config={"text_config": shape}, path=None, name="35B-A3B-shaped")


def curve(model, context: int, max_tokens: int, repeats: int) -> list[float]:
    """Median ms of a trunk forward of M tokens after `context` tokens, M = 1..max_tokens (each rolled back)."""
    from mtpnb.rollback import rollback_cache

    cache = model.make_cache()
    prompt = mx.random.randint(0, model.text_config["vocab_size"], (1, context))
    mx.eval(model.forward(prompt, cache=cache))
    times = []
    for m in range(1, max_tokens + 1):
        ids = mx.random.randint(0, model.text_config["vocab_size"], (1, m))  # distinct tokens: distinct experts

        def forward():
            mx.eval(model.forward(ids, cache=cache))
            rollback_cache(cache, keep=0, discard=m)

        for _ in range(3):  # warm-up: kernel compilation for this shape
            forward()
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            forward()
            samples.append(time.perf_counter() - t)
        times.append(statistics.median(samples) * 1e3)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small model of the same structure (a shape check)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    parser.add_argument("--max-m", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)

    mx.random.seed(0)
    model = build(TINY if args.tiny else SHAPE_35B_A3B, args.bits, args.group_size, getattr(mx, args.dtype))
    lines = [f"{model.name}{' (tiny)' if args.tiny else ''}: {args.bits}-bit g{args.group_size} {args.dtype}, "
             f"context {args.context}, device {mx.default_device()}, median of {args.repeats}"]
    for label, kernels in (("stock", False), ("verify kernels", True)):
        switched = model.use_verify_kernels(kernels)
        t = curve(model, args.context, args.max_m, args.repeats)
        ratios = " ".join(f"{x / t[0]:.2f}" for x in t)
        lines.append(f"{label:15s} t(1) {t[0]:7.2f} ms   t(M)/t(1), M=1..{args.max_m}: {ratios}"
                     + (f"   ({switched} linears switched)" if kernels else ""))
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
