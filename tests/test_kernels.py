"""mtpnb.kernels: the verify-shaped quantized mat-vec loader and its switch.

On the CPU (CI) only the loader's fallback paths run: the CPU backend uses mx.quantized_matmul, the
switch changes nothing in the outputs, a kernel that fails its self-check falls back and says so
once. The CUDA correctness test runs only where MLX's default device is a CUDA GPU; the Metal one
only on a Mac, and it has never been run.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest

from mtpnb import kernels

CUDA = kernels.backend() == "cuda"
METAL = kernels.backend() == "metal"


@pytest.fixture(autouse=True)
def fresh_state():
    kernels.reset()
    yield
    kernels.reset()


def tiny_quantized_model(dtype=mx.bfloat16, bits=4, group_size=64):
    from mlx_lm.models import qwen3

    args = qwen3.ModelArgs(
        model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=2, rms_norm_eps=1e-6, vocab_size=320, num_key_value_heads=1,
        max_position_embeddings=512, head_dim=64, tie_word_embeddings=False, rope_theta=10000.0,
    )
    mx.random.seed(7)
    model = qwen3.Model(args)
    model.set_dtype(dtype)
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def quantized(n, k, bits, group_size, dtype, seed=0):
    key = mx.random.key(seed)
    w = (mx.random.normal((n, k), key=key) * 0.05).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


def rel_err(a, b):
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


# ------------------------------------------------------------------------------------------------
# CPU: the loader's fallback paths


@pytest.mark.skipif(kernels.backend() != "cpu", reason="checks the CPU path")
def test_cpu_backend_uses_the_stock_op():
    assert kernels.backend() == "cpu"
    wq, s, b = quantized(64, 128, 4, 64, mx.bfloat16)
    x = mx.random.normal((3, 128)).astype(mx.bfloat16)
    got = kernels.qmv(x, wq, s, b, 4, 64)
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert mx.array_equal(got, ref).item()
    assert kernels.kernel_status()["checks"] == {}  # no kernel was loaded or checked on the CPU


@pytest.mark.skipif(kernels.backend() != "cpu", reason="checks the CPU path")
@pytest.mark.parametrize("bits", [4, 8])
def test_switch_on_and_off_gives_identical_outputs_on_cpu(bits):
    model = tiny_quantized_model(bits=bits)
    n_stock = sum(type(m) is nn.QuantizedLinear for m in model.modules())
    assert n_stock > 0
    tokens = {t: mx.array([[(7 * i + 3) % 320 for i in range(t)]]) for t in (1, 2, 5, 8, 9, 16)}
    ref = {t: model(x) for t, x in tokens.items()}
    mx.eval(ref)

    assert kernels.enable_verify_kernels(model) == n_stock
    assert kernels.verify_kernels_enabled(model)
    assert all(type(m) is not nn.QuantizedLinear for m in model.modules())
    for t, x in tokens.items():
        assert mx.array_equal(model(x), ref[t]).item(), t

    assert kernels.disable_verify_kernels(model) == n_stock
    assert not kernels.verify_kernels_enabled(model)
    with kernels.verify_kernels(model):
        assert kernels.verify_kernels_enabled(model)
        assert mx.array_equal(model(tokens[5]), ref[5]).item()
    assert not kernels.verify_kernels_enabled(model)
    assert mx.array_equal(model(tokens[5]), ref[5]).item()


class FakeKernel:
    """A 'kernel' for tests: the fp32 dequantized product (right) or garbage (wrong)."""

    def __init__(self, wrong=False):
        self.wrong = wrong
        self.calls = []

    def supports(self, m, n, k, bits, group_size):
        return True

    def __call__(self, x, w, scales, biases, bits, group_size, config=None):
        rows = 1
        for d in x.shape[:-1]:
            rows *= d
        self.calls.append(rows)
        wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
        y = x.astype(mx.float32) @ wd.T
        if self.wrong:
            y = y * -0.5 + 1.0
        return y.astype(x.dtype)


@pytest.fixture
def fake_backend(monkeypatch):
    made = {}

    def install(wrong):
        made["kernel"] = FakeKernel(wrong)
        monkeypatch.setitem(kernels._FACTORIES, "fake", lambda: made["kernel"])
        monkeypatch.setattr(kernels, "backend", lambda: "fake")
        return made["kernel"]

    return install


def test_failed_self_check_falls_back_and_says_so_once(fake_backend):
    fake = fake_backend(wrong=True)
    model = tiny_quantized_model()
    x = mx.array([[1, 2, 3, 4]])
    ref = model(x)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        kernels.enable_verify_kernels(model)
    status = kernels.kernel_status()["checks"][("fake", 4, 64, mx.bfloat16)]
    assert status["ok"] is False
    n_check_calls = len(fake.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second message would raise here
        out = model(x)
        assert kernels.self_check(4, 64, mx.bfloat16, name="fake") is False
    assert mx.array_equal(out, ref).item()
    assert len(fake.calls) == n_check_calls  # the failed kernel is never used for real work


def test_kernel_that_fails_to_load_falls_back(monkeypatch):
    def broken():
        raise FileNotFoundError("no kernels/ here")

    monkeypatch.setitem(kernels._FACTORIES, "fake", broken)
    monkeypatch.setattr(kernels, "backend", lambda: "fake")
    wq, s, b = quantized(64, 128, 4, 64, mx.bfloat16)
    x = mx.random.normal((2, 128)).astype(mx.bfloat16)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        got = kernels.qmv(x, wq, s, b, 4, 64)
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert mx.array_equal(got, ref).item()


def test_switch_routes_1_to_8_rows_to_a_passing_kernel(fake_backend):
    fake = fake_backend(wrong=False)
    model = tiny_quantized_model()
    n_lin = kernels.enable_verify_kernels(model)
    assert kernels.kernel_status()["checks"][("fake", 4, 64, mx.bfloat16)]["ok"] is True
    fake.calls.clear()
    x4 = mx.array([[5, 6, 7, 8]])
    out = model(x4)
    assert fake.calls == [4] * n_lin
    fake.calls.clear()
    model(mx.array([list(range(9))]))  # 9 rows: the stock op
    assert fake.calls == []
    kernels.disable_verify_kernels(model)
    ref = model(x4)
    assert rel_err(out, ref) < 0.1  # the CPU's bf16 stock op is itself ~3e-2 off the fp32 product


def test_ineligible_layers_stay_on_the_stock_op(fake_backend):
    fake = fake_backend(wrong=False)
    wq, s, b = quantized(64, 128, 4, 64, mx.float32)
    x = mx.random.normal((2, 128))  # float32 activations: not a kernel dtype
    got = kernels.qmv(x, wq, s, b, 4, 64)
    assert fake.calls == []
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert mx.array_equal(got, ref).item()


def test_cuda_config_choice():
    c = kernels.choose_cuda_config(4, 5120, 17408, 4, 64)
    assert c is not None and 17408 // 64 % c.u == 0 and c.stages == 0  # v1 by default
    c = kernels.choose_cuda_config(4, 5120, 17408, 4, 64, "ring")
    assert c is not None and c.stages >= 2
    # the ring's shared memory fits the SM with every block of the launch resident
    for n, k in [(5120, 5120), (1024, 5120), (17408, 5120), (5120, 17408)]:
        for bits in (4, 8):
            c = kernels.choose_cuda_config(1, n, k, bits, 64, "ring")
            blocks_per_sm = -(-(n // (16 * c.tiles)) // kernels.SM_COUNT)
            assert blocks_per_sm * (kernels.ring_smem_bytes(c, bits, 64) + 1024) <= kernels.SMEM_PER_SM
    assert kernels.choose_cuda_config(1, 256, 64 * 5, 4, 64, "ring").stages == 0  # odd group count: v1
    assert kernels.choose_cuda_config(1, 256, 64 * 5, 4, 64, "v1").u == 1
    assert kernels.choose_cuda_config(9, 5120, 5120, 4, 64) is None
    assert kernels.choose_cuda_config(1, 5128, 5120, 4, 64) is None  # N not a multiple of 16
    for n, k in [(5120, 5120), (1024, 5120), (17408, 5120), (5120, 17408), (256, 512)]:
        for bits in (4, 8):
            for gs in (32, 64):
                c = kernels.choose_cuda_config(1, n, k, bits, gs)
                assert c is not None and (k // gs) % c.u == 0 and 1 <= c.ksplit <= 16


# ------------------------------------------------------------------------------------------------
# CUDA: the kernel itself (runs only where MLX's default device is a CUDA GPU)

# (N, K) and the launches tried on it: (variant, config); config None = the loader's choice.
CUDA_CASES = [
    ((256, 512), [("ring", None), ("v1", None), ("ring", kernels.CudaConfig(1, 4, 2, 3)),
                  ("ring", kernels.CudaConfig(2, 2, 2, 2)), ("v1", kernels.CudaConfig(2, 4, 2))]),
    ((1024, 3072), [("ring", None), ("v1", None)]),
    ((4096, 1024), [("ring", None)]),
]
CUDA_PARAMS = [(4, 64, mx.bfloat16), (4, 32, mx.bfloat16), (8, 64, mx.bfloat16), (8, 32, mx.bfloat16),
               (4, 64, mx.float16), (8, 32, mx.float16)]


def _log(line):
    print(line)
    log = os.environ.get("MTPNB_KERNEL_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend (default device a CUDA GPU)")
@pytest.mark.parametrize("bits,group_size,dtype", CUDA_PARAMS,
                         ids=[f"{b}bit-g{g}-{'bf16' if d == mx.bfloat16 else 'fp16'}" for b, g, d in CUDA_PARAMS])
def test_cuda_kernel_matches_stock(bits, group_size, dtype):
    import time

    t0 = time.perf_counter()
    kern = kernels._get_kernel("cuda")
    assert kern is not None
    worst = {}
    for i, ((n, k), launches) in enumerate(CUDA_CASES):
        wq, s, b = quantized(n, k, bits, group_size, dtype, seed=100 + i)
        wd = mx.dequantize(wq, s, b, group_size=group_size, bits=bits).astype(mx.float32)
        for m in range(1, 9):
            shape = (2, 3, k) if m == 6 else (m, k)  # one 3-D input: rows = all leading dims
            x = mx.random.normal(shape, key=mx.random.key(1000 * i + m)).astype(dtype)
            stock = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group_size, bits=bits)
            exact = x.astype(mx.float32) @ wd.T
            stock_exact = rel_err(stock, exact)
            for variant, cfg in launches:
                # Output poisoned with NaN before the launch: every element must be written.
                y = kern(x, wq, s, b, bits, group_size, config=cfg, variant=variant, init_value=float("nan"))
                assert y.shape == shape[:-1] + (n,) and y.dtype == dtype
                e_stock, e_exact = rel_err(y, stock), rel_err(y, exact)
                worst[(n, k, m, variant, cfg)] = (e_stock, e_exact, stock_exact)
                assert e_stock < 1e-2, ((n, k, m, variant, cfg), e_stock)
                assert e_exact <= max(2 * stock_exact, 5e-3), ((n, k, m, variant, cfg), e_exact, stock_exact)
    es = max(v[0] for v in worst.values())
    ee = max(v[1] for v in worst.values())
    se = max(v[2] for v in worst.values())
    _log(f"CUDA qmv {bits}-bit g{group_size} {'bf16' if dtype == mx.bfloat16 else 'fp16'}: "
         f"{len(worst)} cases (M=1..8, {len(CUDA_CASES)} shapes, ring+v1 launches) all pass; max rel err "
         f"vs quantized_matmul {es:.2e}, vs fp32 product {ee:.2e} (stock vs fp32 {se:.2e}); "
         f"{time.perf_counter() - t0:.1f} s")


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend (default device a CUDA GPU)")
def test_cuda_switch_on_a_model():
    model = tiny_quantized_model()
    x = mx.array([[3, 1, 4, 1, 5]])
    ref = model(x)
    kernels.enable_verify_kernels(model)
    assert kernels.kernel_status()["checks"][("cuda", 4, 64, mx.bfloat16)]["ok"] is True
    out = model(x)
    assert rel_err(out, ref) < 5e-2
    fwd = mx.compile(lambda t: model(t))
    assert rel_err(fwd(x), out) < 1e-3


# ------------------------------------------------------------------------------------------------
# Metal: written, never run


@pytest.mark.skipif(not METAL, reason="Metal kernel is untested: needs a Mac with MLX's Metal backend")
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_metal_kernel_matches_stock(bits, group_size):
    kern = kernels._get_kernel("metal")
    assert kern is not None
    for i, (n, k) in enumerate([(256, 512), (1024, 2048), (520, 1024)]):
        wq, s, b = quantized(n, k, bits, group_size, mx.bfloat16, seed=i)
        for m in range(1, 9):
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            stock = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group_size, bits=bits)
            assert rel_err(kern(x, wq, s, b, bits, group_size), stock) < 1e-2
