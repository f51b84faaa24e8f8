"""Verify-shaped quantized mat-vec kernels: y[M, N] = x[M, K] @ dequant(W)^T for M = 1..8 rows.

A speculative verify runs the trunk on D+1 tokens. With MLX's stock small-M quantized path every
extra row re-reads every weight (on an H200 a 27B-shaped 4-bit stack costs 3.3x for 4 rows than for
one). The kernels in ``mtpnb/kernel_sources/`` (package data) read each weight once for all rows:

- CUDA (``qmv_verify_cuda.cuh``, through ``mx.fast.cuda_kernel``): tensor-core mma with the
  rows as the mma's N=8 side, per-group scale and bias applied in fp32 after the mma. Measured on an
  H200 (the repository's benchmarks/kernels/NOTES.md): a 27B-shaped 4-bit stack verifies 4 tokens
  for 1.24x one token (stock MLX 3.19x) and one token runs 1.4x faster than stock; weights stream at
  ~1.05 TB/s per forward,
  short of the card's bandwidth (per-kernel latency and MLX's per-launch overhead, see the notes).
- Metal (``qmv_verify_metal.metal``, through ``mx.fast.metal_kernel``): the same
  read-once, all-rows-in-registers, per-group-post-scale scheme with SIMD FMAs. UNTESTED: nobody has
  run it on a Mac yet; it is guarded by the same self-check, so a wrong result falls back.
- CPU: MLX's own ``mx.quantized_matmul``; there is no kernel.

Before a kernel is used for a (bits, group size, dtype) it is checked once against
``mx.quantized_matmul`` on random data; on a mismatch (or a compile error) that combination falls
back to the stock op for the rest of the process and a warning says so, once.

The switch::

    from mtpnb.kernels import enable_verify_kernels, disable_verify_kernels, verify_kernels
    n = enable_verify_kernels(model)   # nn.QuantizedLinear -> VerifyQuantizedLinear, in place
    ...
    disable_verify_kernels(model)
    with verify_kernels(model): ...     # the same, scoped

Routed experts are not covered: an MoE layer's experts (mlx-lm's ``QuantizedSwitchLinear``) run MLX's
``mx.gather_qmm``, which reads each token's own experts, so a verify of M tokens reads up to M times
as many expert weights whatever the kernel; a gathered kernel would need the rows grouped by expert,
and with few rows (M <= 8) times 8 experts out of 128-256 few rows share an expert. The switch
covers an MoE model's dense parts: attention and Gated DeltaNet projections, the shared expert, the
router gates and an untied lm_head. ``coverage(model)`` says what is switched and what stays
stock; ``Model.info()`` (and so ``mtpnb info`` and ``mtpnb bench``'s report) carries it.

``VerifyQuantizedLinear`` calls the kernel when the input has 1..8 rows (all leading dims
multiplied) and the layer is affine 4- or 8-bit with group size 32 or 64; otherwise it is exactly
``nn.QuantizedLinear``. Swapping is a class change on the existing module objects: no weights are
copied, and turning it off restores the stock class.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

__all__ = [
    "MAX_ROWS",
    "VerifyQuantizedLinear",
    "backend",
    "choose_cuda_config",
    "coverage",
    "disable_verify_kernels",
    "enable_verify_kernels",
    "kernel_status",
    "qmv",
    "reset",
    "self_check",
    "verify_kernels",
    "verify_kernels_enabled",
]

MAX_ROWS = 8
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64)
SUPPORTED_DTYPES = (mx.bfloat16, mx.float16)

_CUDA_HEADER = "qmv_verify_cuda.cuh"
_METAL_SOURCE = "qmv_verify_metal.metal"


def kernels_dir() -> Path:
    """Where the kernel sources are: $MTPNB_KERNELS_DIR, else the package's ``kernel_sources/``."""
    env = os.environ.get("MTPNB_KERNELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "kernel_sources"


def backend() -> str:
    """'cuda', 'metal' or 'cpu': what the default device runs on."""
    dev = mx.default_device()
    if dev.type != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


# ---------------------------------------------------------------------------------------------
# CUDA


@dataclass(frozen=True)
class CudaConfig:
    tiles: int       # 16-row mma tiles per warp
    ksplit: int      # warps per block, splitting K
    u: int           # groups per batch
    stages: int = 0  # 0: the register-double-buffered kernel ("v1"); >= 2: the cp.async ring kernel


# H200 (the machine the defaults were tuned on): SMs, shared memory per SM and per block (bytes),
# and what the driver keeps per block.
SM_COUNT = 132
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024


def ring_lane_bytes(bits: int, group_size: int, tiles: int, u: int) -> int:
    """Shared memory per lane and stage of the ring kernel (mirrors ring_lane_bytes() in the .cuh)."""
    wpt = group_size * bits // 128
    nr = (u + 1) // 2
    raw = 4 * (tiles * 2 * u * wpt + 2 * tiles * 2 * nr) + u * (group_size // 32) * 16
    return ((raw // 16) | 1) * 16


def ring_smem_bytes(cfg: CudaConfig, bits: int, group_size: int) -> int:
    return cfg.ksplit * cfg.stages * 32 * ring_lane_bytes(bits, group_size, cfg.tiles, cfg.u)


def _ksplit(nblk: int, batches: int) -> int:
    # Enough warps for the memory system (up to ~2048, one wave), each with >= 4 batches.
    ksplit = 1
    while ksplit < 16 and nblk * ksplit * 2 <= 2048 and batches >= 4 * ksplit:
        ksplit *= 2
    return ksplit


def choose_cuda_config(m: int, n: int, k: int, bits: int, group_size: int,
                       variant: str = "v1") -> Optional[CudaConfig]:
    """Launch shape for one call, or None if the shape is not one the kernel takes.

    variant "v1" (the default: measured faster on the H200): the register-double-buffered kernel;
    "ring": the cp.async kernel, as many stages as fit in shared memory with all blocks resident in
    one wave (falls back to a v1 shape when K has an odd number of groups).
    $MTPNB_QMV_CONFIG="tiles,ksplit,u[,stages]" overrides it (tuning).
    """
    if not (1 <= m <= MAX_ROWS) or n % 16 or k % group_size or k % 8:
        return None
    wpt = group_size * bits // 128
    groups = k // group_size
    env = os.environ.get("MTPNB_QMV_CONFIG")
    if env:
        vals = [int(v) for v in env.split(",")]
        cfg = CudaConfig(*vals)
        if n % (16 * cfg.tiles) or groups % cfg.u or (cfg.stages and cfg.u not in (2, 4)):
            return None
        return cfg
    if variant == "ring" and groups % 2 == 0:
        u, tiles = 2, 1
        nblk = n // 16
        batches = groups // u
        ksplit = _ksplit(nblk, batches)
        per_sm = -(-nblk // SM_COUNT)  # blocks per SM in one wave
        static = ksplit * 16 * tiles * 8 * 4 if ksplit > 1 else 0
        budget = min(SMEM_PER_SM // per_sm - SMEM_RESERVED_PER_BLOCK, SMEM_PER_BLOCK) - static
        per_stage = ksplit * 32 * ring_lane_bytes(bits, group_size, tiles, u)
        per_warp = -(-batches // ksplit)
        stages = min(budget // per_stage, 8, per_warp + 1)
        if stages >= 2:
            return CudaConfig(tiles, ksplit, u, stages)
    # Register budget: two batches of tiles*2*u*wpt words; 8 words per batch keeps ~100 registers.
    u = next(u for u in (4, 2, 1) if groups % u == 0 and u * wpt <= 8)
    nblk = n // 16
    return CudaConfig(1, _ksplit(nblk, groups // u), u)


_CUDA_BODY_V1 = """
  int M = 1;
  for (int i = 0; i < x_ndim - 1; ++i) M *= x_shape[i];
  mtpnb_qmv::qmv_verify_impl<T, BITS, GS, TILES, KSPLIT, U>(
      x, w, scales, biases, y, M, w_shape[0], x_shape[x_ndim - 1]);
"""
_CUDA_BODY_RING = """
  int M = 1;
  for (int i = 0; i < x_ndim - 1; ++i) M *= x_shape[i];
  mtpnb_qmv::qmv_verify_ring_impl<T, BITS, GS, TILES, KSPLIT, U, STAGES>(
      x, w, scales, biases, y, M, w_shape[0], x_shape[x_ndim - 1]);
"""


class _CudaKernel:
    name = "cuda"
    # Tried in this order by the self-check; the first that passes is used. On the H200 v1 was the
    # faster (benchmarks/kernels/NOTES.md); the ring variant stays as a checked fallback and for tuning
    # ($MTPNB_QMV_VARIANT=ring).
    variants = ("v1", "ring")

    def __init__(self) -> None:
        self._header = (kernels_dir() / _CUDA_HEADER).read_text()
        self._v1 = self._make("mtpnb_qmv_verify", _CUDA_BODY_V1, 0)
        self._ring: dict[int, object] = {}
        # (bits, group_size, dtype) -> variant that passed the self-check
        self.preferred: dict[tuple, str] = {}

    def _make(self, name, body, smem):
        return mx.fast.cuda_kernel(
            name=name, input_names=["x", "w", "scales", "biases"], output_names=["y"],
            source=body, header=self._header, ensure_row_contiguous=True, shared_memory=smem)

    def supports(self, m: int, n: int, k: int, bits: int, group_size: int) -> bool:
        return choose_cuda_config(m, n, k, bits, group_size, "v1") is not None

    def __call__(self, x, w, scales, biases, bits, group_size, config: Optional[CudaConfig] = None,
                 variant: Optional[str] = None, init_value: Optional[float] = None):
        k = x.shape[-1]
        m = 1
        for d in x.shape[:-1]:
            m *= d
        n = w.shape[0]
        variant = variant or os.environ.get("MTPNB_QMV_VARIANT") or \
            self.preferred.get((bits, group_size, x.dtype), "v1")
        cfg = config or choose_cuda_config(m, n, k, bits, group_size, variant)
        template = [("T", x.dtype), ("BITS", bits), ("GS", group_size),
                    ("TILES", cfg.tiles), ("KSPLIT", cfg.ksplit), ("U", cfg.u)]
        if cfg.stages:
            smem = ring_smem_bytes(cfg, bits, group_size)
            if smem not in self._ring:
                self._ring[smem] = self._make(f"mtpnb_qmv_ring_{smem}", _CUDA_BODY_RING, smem)
            kern = self._ring[smem]
            template.append(("STAGES", cfg.stages))
        else:
            kern = self._v1
        threads = 32 * cfg.ksplit
        blocks = n // (16 * cfg.tiles)
        return kern(
            inputs=[x, w, scales, biases],
            template=template,
            grid=(blocks * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[tuple(x.shape[:-1]) + (n,)],
            output_dtypes=[x.dtype],
            init_value=init_value,  # tests poison the output with NaN: every element must be written
        )[0]


# ---------------------------------------------------------------------------------------------
# Metal (untested: written for the same algorithm, never run; the self-check guards it)


class _MetalKernel:
    name = "metal"
    ROWS = 4    # output rows per simdgroup
    SIMDS = 2   # simdgroups per threadgroup

    def __init__(self) -> None:
        text = (kernels_dir() / _METAL_SOURCE).read_text()
        header, _, body = text.partition("// ---- body ----")
        self._kernel = mx.fast.metal_kernel(
            name="mtpnb_qmv_verify",
            input_names=["x", "w", "scales", "biases"],
            output_names=["y"],
            source=body,
            header=header,
            ensure_row_contiguous=True,
        )

    def supports(self, m: int, n: int, k: int, bits: int, group_size: int) -> bool:
        return 1 <= m <= MAX_ROWS and k % group_size == 0 and k % 8 == 0

    def __call__(self, x, w, scales, biases, bits, group_size, config=None):
        m, k = x.shape
        n = w.shape[0]
        rows_per_tg = self.ROWS * self.SIMDS
        tgs = (n + rows_per_tg - 1) // rows_per_tg
        return self._kernel(
            inputs=[x, w, scales, biases],
            template=[("T", x.dtype), ("BITS", bits), ("GS", group_size),
                      ("ROWS", self.ROWS), ("SIMDS", self.SIMDS)],
            grid=(tgs * 32 * self.SIMDS, 1, 1),
            threadgroup=(32 * self.SIMDS, 1, 1),
            output_shapes=[(m, n)],
            output_dtypes=[x.dtype],
        )[0]


# ---------------------------------------------------------------------------------------------
# Loader state: one kernel object per backend, one self-check per (backend, bits, gs, dtype).

_lock = threading.RLock()
_kernels: dict[str, object] = {}
_checks: dict[tuple, dict] = {}
_warned: set = set()
# Tests (and a future backend) can put a kernel here: name -> factory.
_FACTORIES: dict[str, Callable[[], object]] = {"cuda": _CudaKernel, "metal": _MetalKernel}

# Self-check tolerance: relative L2 error against mx.quantized_matmul. The kernel keeps fp32 until
# the output is rounded to the activation dtype; the stock op partly accumulates in that dtype (on
# the CPU in bf16 it is ~3e-2 off the fp32 product). A kernel passes if it is within
# max(CHECK_TOL, 2 x the stock op's own error) of the stock op; a wrong one is off by O(1).
CHECK_TOL = 2e-2


def reset() -> None:
    """Forget kernels, self-check results and warnings (tests)."""
    with _lock:
        _kernels.clear()
        _checks.clear()
        _warned.clear()


def _warn_once(key, msg: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _get_kernel(name: str):
    with _lock:
        if name not in _kernels:
            factory = _FACTORIES.get(name)
            if factory is None:
                _kernels[name] = None
            else:
                try:
                    _kernels[name] = factory()
                except Exception as e:  # missing source, no such mx.fast function, ...
                    _kernels[name] = None
                    _warn_once(("load", name), f"mtpnb.kernels: the {name} verify kernel could not be "
                               f"loaded ({type(e).__name__}: {e}); using mx.quantized_matmul")
        return _kernels[name]


def _rel_err(a: mx.array, b: mx.array) -> float:
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    den = mx.sqrt(mx.sum(b * b)).item()
    num = mx.sqrt(mx.sum((a - b) * (a - b))).item()
    if num != num:  # NaN
        return float("inf")
    return num / max(den, 1e-30)


def _is_tracing_error(e: Exception) -> bool:
    return "function transformations" in str(e) or "during compile" in str(e)


def _why(result: dict) -> str:
    if result.get("reason"):
        return result["reason"]
    return f"relative error {max(result['errors'].values()):.3g} > {CHECK_TOL}"


def _check_one(kern, bits: int, group_size: int, dtype, variant) -> dict:
    result = {"ok": True, "errors": {}}
    kw = {} if variant is None else {"variant": variant}
    try:
        seed = 1234 + 10 * bits + group_size
        n, k = 256, 8 * group_size
        w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        wd = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
        for m in (1, 3, 8):
            x = mx.random.normal((m, k), key=mx.random.key(seed + m)).astype(dtype)
            ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                      group_size=group_size, bits=bits)
            exact = x.astype(mx.float32) @ wd.T
            got = kern(x, wq, scales, biases, bits, group_size, **kw)
            err = _rel_err(got, ref)
            stock_err = _rel_err(ref, exact)
            result["errors"][m] = err
            result.setdefault("stock_errors", {})[m] = stock_err
            # Off the stock op by no more than the stock op is off the fp32 product (x2), or
            # CHECK_TOL, whichever is larger.
            if not err <= max(CHECK_TOL, 2 * stock_err) or got.shape != ref.shape \
                    or got.dtype != ref.dtype:
                result["ok"] = False
    except Exception as e:
        if _is_tracing_error(e):  # inside mx.compile/vmap: not a verdict, try again eagerly
            raise
        result = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    return result


def self_check(bits: int, group_size: int, dtype, name: Optional[str] = None) -> bool:
    """Check the backend's kernel for (bits, group_size, dtype) against mx.quantized_matmul, once.

    Returns whether the kernel may be used. Runs eagerly (it evaluates arrays), so call it outside
    mx.compile; enable_verify_kernels does it for every combination in the model.
    """
    name = name or backend()
    key = (name, bits, group_size, dtype)
    with _lock:
        if key in _checks:
            return _checks[key]["ok"]
        kern = _get_kernel(name)
        if kern is None:
            _checks[key] = {"ok": False, "reason": "no kernel for this backend"}
            return False
        result = None
        failed = []
        for variant in getattr(kern, "variants", (None,)):
            result = _check_one(kern, bits, group_size, dtype, variant)
            if result["ok"]:
                result["variant"] = variant
                if variant is not None:
                    kern.preferred[(bits, group_size, dtype)] = variant
                break
            failed.append((variant, result))
        if result["ok"] and failed:
            _warn_once(("variant",) + key, f"mtpnb.kernels: the {name} verify kernel's {failed[0][0]} "
                       f"variant failed its self-check for bits={bits} group_size={group_size} {dtype} "
                       f"({_why(failed[0][1])}); using its {result['variant']} variant")
            result["failed_variants"] = {str(v): r for v, r in failed}
        _checks[key] = result
        if not result["ok"]:
            _warn_once(("check",) + key, f"mtpnb.kernels: the {name} verify kernel failed its self-check "
                       f"for bits={bits} group_size={group_size} {dtype} ({_why(result)}); "
                       "using mx.quantized_matmul for it")
        return result["ok"]


def kernel_status() -> dict:
    """What has been loaded and checked: {backend, checks: {(backend, bits, gs, dtype): result}}."""
    with _lock:
        return {"backend": backend(), "checks": dict(_checks)}


def _eligible(x_rows: int, k: int, n: int, bits: int, group_size: int, mode: str, dtype, has_biases: bool):
    return (mode == "affine" and has_biases and bits in SUPPORTED_BITS and group_size in SUPPORTED_GROUPS
            and dtype in SUPPORTED_DTYPES and 1 <= x_rows <= MAX_ROWS)


def qmv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
        mode: str = "affine") -> mx.array:
    """x[..., K] @ dequant(w)^T: the kernel when it applies and passed its check, else the stock op."""
    k = x.shape[-1]
    n = w.shape[0]
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    name = backend()
    if name != "cpu" and _eligible(rows, k, n, bits, group_size, mode, x.dtype, biases is not None) \
            and scales.dtype == x.dtype:
        kern = _get_kernel(name)
        key = (name, bits, group_size, x.dtype)
        ok = _checks.get(key, {}).get("ok")
        if ok is None:
            try:
                ok = self_check(bits, group_size, x.dtype, name)
            except Exception:  # e.g. called while tracing mx.compile: check later, use stock now
                ok = False
                _checks.pop(key, None)
        if ok and kern is not None and kern.supports(rows, n, k, bits, group_size):
            return kern(x, w, scales, biases, bits, group_size)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size,
                               bits=bits, mode=mode)


# ---------------------------------------------------------------------------------------------
# The switch


class VerifyQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that sends 1..8-row inputs to the verify kernel (same parameters)."""

    def __call__(self, x):
        if self.mode != "affine" or self.get("biases") is None:
            return super().__call__(x)
        y = qmv(x, self["weight"], self["scales"], self["biases"], self.bits, self.group_size, self.mode)
        if "bias" in self:
            y = y + self["bias"]
        return y


def _quantized_linears(model: nn.Module, cls) -> list:
    return [m for m in model.modules() if type(m) is cls]


def enable_verify_kernels(model: nn.Module, check: bool = True) -> int:
    """Switch every nn.QuantizedLinear of `model` onto the verify kernel; returns how many.

    With check=True the self-check runs now for each (bits, group size, dtype) in the model on a
    GPU backend, so that it is not first needed inside an mx.compile trace.
    """
    mods = _quantized_linears(model, nn.QuantizedLinear)
    name = backend()
    seen = set()
    for m in mods:
        m.__class__ = VerifyQuantizedLinear
        if check and name != "cpu" and m.mode == "affine" and m.get("biases") is not None:
            combo = (m.bits, m.group_size, m["scales"].dtype)
            if combo not in seen and m.bits in SUPPORTED_BITS and m.group_size in SUPPORTED_GROUPS \
                    and combo[2] in SUPPORTED_DTYPES:
                seen.add(combo)
                self_check(*combo, name=name)
    return len(mods)


def disable_verify_kernels(model: nn.Module) -> int:
    """Put every VerifyQuantizedLinear of `model` back to nn.QuantizedLinear; returns how many."""
    mods = _quantized_linears(model, VerifyQuantizedLinear)
    for m in mods:
        m.__class__ = nn.QuantizedLinear
    return len(mods)


def coverage(model: nn.Module) -> dict:
    """What the switch covers in `model`: quantized linears (switched now, or not) and the routed
    experts' layers it leaves on MLX's gather_qmm, with their weight bytes."""

    def nbytes(modules):
        return sum(v.nbytes for m in modules for k, v in m.items() if isinstance(v, mx.array))

    stock = _quantized_linears(model, nn.QuantizedLinear)
    switched = _quantized_linears(model, VerifyQuantizedLinear)
    experts = [m for m in model.modules() if type(m).__name__ == "QuantizedSwitchLinear"]
    return {"switched": len(switched), "switchable": len(stock) + len(switched),
            "linear_mb": round(nbytes(stock + switched) / 2**20, 1),
            "routed_expert_layers": len(experts), "routed_expert_mb": round(nbytes(experts) / 2**20, 1)}


def describe_coverage(cov: dict) -> str | None:
    """One line on the switch for a quantized model (None when nothing is quantized)."""
    if not cov["switchable"] and not cov["routed_expert_layers"]:
        return None
    state = f"on for {cov['switched']} of" if cov["switched"] else "off;"
    line = f"{state} {cov['switchable']} quantized linears ({cov['linear_mb']} MB)"
    if cov["routed_expert_layers"]:
        line += (f"; the routed experts ({cov['routed_expert_layers']} layers, {cov['routed_expert_mb']} MB) "
                 "always run MLX's gather_qmm")
    return line


def verify_kernels_enabled(model: nn.Module) -> bool:
    return any(type(m) is VerifyQuantizedLinear for m in model.modules())


@contextlib.contextmanager
def verify_kernels(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Scope in which `model`'s quantized linears use the verify kernel (if `enabled`)."""
    if not enabled:
        yield model
        return
    was = verify_kernels_enabled(model)
    enable_verify_kernels(model)
    try:
        yield model
    finally:
        if not was:
            disable_verify_kernels(model)
