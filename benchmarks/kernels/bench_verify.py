"""Verify-cost benchmark: a 27B-shaped stack of quantized linears, stock MLX vs the verify kernel.

Reproduces the table of ../shared/device/README.md (mx.compile'd forward of M tokens through
64 layers of hidden 5120 / MLP 17408, 4-bit affine, group 64) with the kernel switched off and on in
the same run, plus an 8-bit row, and prints ms per forward, the ratio to M=1 and the effective weight
read rate at M=1. Writes everything as JSON.

    PYTHONPATH=$PWD python3 benchmarks/kernels/bench_verify.py --out bench.json            # the table
    PYTHONPATH=$PWD python3 benchmarks/kernels/bench_verify.py --sweep --out sweep.json    # + per-linear launch configs

Each layer: q, o: 5120->5120; k, v: 5120->1024; gate, up: 5120->17408; down: 17408->5120
(11.9 GB of 4-bit weights with scales and biases, the README's stack). Random weights (the bits of
the packed words are random, scales and biases small): speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
try:
    from mtpnb import kernels  # noqa: E402
except Exception:  # the package's other imports (mlx-lm, ...) are missing here: load the file alone
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "mtpnb_kernels", Path(__file__).resolve().parents[2] / "mtpnb" / "kernels.py")
    kernels = importlib.util.module_from_spec(_spec)
    sys.modules["mtpnb_kernels"] = kernels
    _spec.loader.exec_module(kernels)

MS = (1, 2, 3, 4, 5, 6, 8)


def quantized_linear(n_in, n_out, bits, gs, dtype=mx.bfloat16):
    """nn.QuantizedLinear with random packed weights, made without the fp32 matrix."""
    ql = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
    nn.Module.__init__(ql)
    ql.group_size, ql.bits, ql.mode = gs, bits, "affine"
    ql.weight = mx.random.bits((n_out, n_in * bits // 32), width=4).view(mx.uint32) \
        if hasattr(mx.random, "bits") else mx.random.randint(0, 2**31, (n_out, n_in * bits // 32)).astype(mx.uint32)
    levels = 2**bits - 1
    ql.scales = (mx.random.uniform(0.5, 1.5, (n_out, n_in // gs)) * (0.04 / levels)).astype(dtype)
    ql.biases = (-ql.scales.astype(mx.float32) * (levels / 2)
                 + mx.random.normal((n_out, n_in // gs)) * 1e-3).astype(dtype)
    ql.freeze()
    return ql


class Layer(nn.Module):
    def __init__(self, hidden, mlp, kv, bits, gs):
        super().__init__()
        self.q = quantized_linear(hidden, hidden, bits, gs)
        self.k = quantized_linear(hidden, kv, bits, gs)
        self.v = quantized_linear(hidden, kv, bits, gs)
        self.o = quantized_linear(hidden, hidden, bits, gs)
        self.gate = quantized_linear(hidden, mlp, bits, gs)
        self.up = quantized_linear(hidden, mlp, bits, gs)
        self.down = quantized_linear(mlp, hidden, bits, gs)

    def __call__(self, x):
        a = mx.fast.rms_norm(x, None, 1e-6)
        q, k, v = self.q(a), self.k(a), self.v(a)
        x = x + self.o(q * (1.0 + mx.mean(k * v, axis=-1, keepdims=True)))
        a = mx.fast.rms_norm(x, None, 1e-6)
        return x + self.down(nn.silu(self.gate(a)) * self.up(a))


class Stack(nn.Module):
    def __init__(self, layers, hidden, mlp, kv, bits, gs):
        super().__init__()
        self.layers = []
        for _ in range(layers):
            self.layers.append(Layer(hidden, mlp, kv, bits, gs))
            mx.eval(self.layers[-1].parameters())

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def weight_bytes(model) -> int:
    return sum(m.weight.nbytes + m.scales.nbytes + m.biases.nbytes
               for m in model.modules() if isinstance(m, nn.QuantizedLinear))


def time_ms(fn, *args, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        mx.eval(fn(*args))
    mx.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        mx.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def bench_stack(bits, gs, layers, hidden, mlp, kv, iters, modes=("stock", "kernel")) -> dict:
    mx.random.seed(0)
    model = Stack(layers, hidden, mlp, kv, bits, gs)
    nbytes = weight_bytes(model)
    res = {"bits": bits, "group_size": gs, "layers": layers, "hidden": hidden, "mlp": mlp, "kv": kv,
           "weight_bytes": nbytes, "ms": {}}
    for mode in modes:
        if mode == "kernel":
            kernels.enable_verify_kernels(model)
        else:
            kernels.disable_verify_kernels(model)
        fwd = mx.compile(lambda x: model(x))
        res["ms"][mode] = {}
        for m in MS:
            x = mx.random.normal((1, m, hidden)).astype(mx.bfloat16)
            res["ms"][mode][m] = time_ms(fwd, x, iters=iters)
            print(f"  {bits}-bit {mode:6s} M={m}: {res['ms'][mode][m]:.2f} ms", flush=True)
    kernels.disable_verify_kernels(model)
    model = fwd = None  # the weights go before the next stack is built (the compiled forward holds them too)
    mx.clear_cache()
    return res


def print_stack(res: dict) -> None:
    nb = res["weight_bytes"]
    if res.get("floor"):
        print("\nOverhead floor: the same graph with tiny matrices", end="")
    print(f"\n{res['layers']} layers x (hidden {res['hidden']}, MLP {res['mlp']}), {res['bits']}-bit, "
          f"group {res['group_size']}, {nb / 1e9:.1f} GB of weights; ms per forward (ratio vs M=1)")
    print("| mode | " + " | ".join(f"M={m}" for m in MS) + " | t(4)/t(1) | weights at M=1 |")
    print("|---|" + "---|" * (len(MS) + 2))
    for mode, row in res["ms"].items():
        t1 = row[1]
        cells = " | ".join(f"{row[m]:.2f} ({row[m] / t1:.2f}x)" for m in MS)
        print(f"| {mode} | {cells} | {row[4] / t1:.2f} | {nb / (t1 * 1e-3) / 1e12:.2f} TB/s |")


# ---------------------------------------------------------------------------------------------
# Per-linear sweep of CUDA launch configs (tuning data for choose_cuda_config)

SWEEP_SHAPES = [(5120, 5120), (1024, 5120), (17408, 5120), (5120, 17408)]
SWEEP_CONFIGS = [(1, 1, 4), (1, 2, 4), (1, 4, 4), (1, 8, 4), (1, 8, 2), (1, 16, 1),
                 (2, 1, 2), (2, 2, 2), (2, 4, 2), (2, 2, 4)]
SWEEP_MS = (1, 4)


def sweep(bits, gs, iters) -> list:
    kern = kernels._get_kernel("cuda")
    rows = []
    for n, k in SWEEP_SHAPES:
        lin = [quantized_linear(k, n, bits, gs) for _ in range(1)]
        per = lin[0].weight.nbytes + lin[0].scales.nbytes + lin[0].biases.nbytes
        copies = max(2, math.ceil(400e6 / per))
        lin += [quantized_linear(k, n, bits, gs) for _ in range(copies - 1)]
        mx.eval([(l.weight, l.scales, l.biases) for l in lin])
        auto = {m: kernels.choose_cuda_config(m, n, k, bits, gs) for m in SWEEP_MS}
        for m in SWEEP_MS:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            f = mx.compile(lambda x: [mx.quantized_matmul(x, l.weight, l.scales, l.biases, transpose=True,
                                                          group_size=gs, bits=bits) for l in lin])
            t = time_ms(f, x, iters=iters) / copies
            rows.append({"n": n, "k": k, "bits": bits, "gs": gs, "m": m, "config": "stock", "us": 1e3 * t,
                         "TBps": per / (t * 1e-3) / 1e12})
            for cfg in SWEEP_CONFIGS:
                c = kernels.CudaConfig(*cfg)
                if n % (16 * c.tiles) or (k // gs) % c.u:
                    continue
                f = mx.compile(lambda x, c=c: [kern(x, l.weight, l.scales, l.biases, bits, gs, config=c)
                                               for l in lin])
                try:
                    t = time_ms(f, x, iters=iters) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"  config {cfg} failed: {e}")
                    continue
                rows.append({"n": n, "k": k, "bits": bits, "gs": gs, "m": m, "config": list(cfg),
                             "auto": cfg == (auto[m].tiles, auto[m].ksplit, auto[m].u),
                             "us": 1e3 * t, "TBps": per / (t * 1e-3) / 1e12})
        best = {}
        for r in rows:
            if r["n"] == n and r["k"] == k and r["bits"] == bits and r["config"] != "stock":
                if r["m"] not in best or r["us"] < best[r["m"]]["us"]:
                    best[r["m"]] = r
        stock = {r["m"]: r for r in rows if r["n"] == n and r["k"] == k and r["bits"] == bits
                 and r["config"] == "stock"}
        autos = {r["m"]: r for r in rows if r["n"] == n and r["k"] == k and r["bits"] == bits and r.get("auto")}
        for m in SWEEP_MS:
            a = autos.get(m)
            print(f"  {n}x{k} {bits}-bit M={m}: stock {stock[m]['us']:.1f} us ({stock[m]['TBps']:.2f} TB/s), "
                  f"auto {a['config'] if a else '-'} {a['us'] if a else float('nan'):.1f} us, "
                  f"best {best[m]['config']} {best[m]['us']:.1f} us ({best[m]['TBps']:.2f} TB/s)", flush=True)
        lin = f = None  # this shape's copies go before the next shape's are made
        mx.clear_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--mlp", type=int, default=17408)
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="also time launch configs per linear shape")
    ap.add_argument("--no-stack", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="also time the same graph with tiny matrices (hidden 256, MLP 512): the per-op "
                         "overhead that no kernel can remove")
    ap.add_argument("--out", default="bench_verify.json")
    args = ap.parse_args()

    import os

    info = {"mlx": mx.__version__, "device": str(mx.default_device()), "backend": kernels.backend(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "MTPNB_"))}}
    print(info, flush=True)
    out = {"info": info, "stacks": [], "sweep": []}
    if kernels.backend() != "cpu":
        for bits in args.bits:
            ok = kernels.self_check(bits, args.group_size, mx.bfloat16)
            print(f"self-check {bits}-bit g{args.group_size} bf16: {ok} "
                  f"{kernels.kernel_status()['checks'][(kernels.backend(), bits, args.group_size, mx.bfloat16)]}")
    if args.sweep and kernels.backend() == "cuda":
        for bits in args.bits:
            out["sweep"] += sweep(bits, args.group_size, args.iters)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    if not args.no_stack:
        for bits in args.bits:
            res = bench_stack(bits, args.group_size, args.layers, args.hidden, args.mlp, args.kv, args.iters)
            out["stacks"].append(res)
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        if args.floor:
            res = bench_stack(args.bits[0], args.group_size, args.layers, 256, 512, 128, args.iters)
            res["floor"] = True
            out["stacks"].append(res)
        for res in out["stacks"]:
            print_stack(res)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
