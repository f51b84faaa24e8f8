"""The CPU's verify kernels: float32 matmuls of 1..8 rows that read each weight once, the Gated
DeltaNet recurrence in one call, and a Qwen3.5 MTP head's draft steps.

On the CPU, MLX sends every float32 matmul to BLAS's gemm, which packs the weights into panels
sized for large batches. A verify of M tokens then pays almost M times for what is a
bandwidth-bound job, and one token (OpenBLAS 0.3.21 runs M = 1 through gemm too) streams the
weights at a fraction of the memory bandwidth. ``kernel_sources/verify_cpu.c`` reads every
weight row once for all rows of x; its sums are in an order that depends on K only, so a verify
scores each token bitwise as plain decoding does.

mlx-lm runs the Gated DeltaNet recurrence on the CPU as about ten MLX ops per token and layer (its
fused kernel is Metal's), so each verified token adds their dispatch. ``gated_delta`` runs T steps in
one C call, with the same arithmetic per step whatever T is (a verify, a prefill and plain decoding
agree bitwise); a rollback gets the state after a verify's first n steps by running them again.

MLX has no custom CPU kernels from Python, so the C file is compiled with the system's C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, or fewer flags where the compiler refuses them) the
first time it is needed, cached under
``$MTPNB_CACHE_DIR`` (default ``~/.cache/mtpnb``) per source, compiler and CPU, and called through
ctypes on the arrays' memory. The call evaluates its input first: the kernel needs the numbers.
Before first use the library is checked against MLX's matmul and mlx-lm's recurrence on random data;
with no compiler, a failed build or a failed check, a warning says so once and MLX's ops run.

``HeadDraftSteps`` runs a one-layer Qwen3.5 MTP head's draft steps in C, all of a round's in one call,
the drafts chosen (argmax) or drawn there (through MLX each step is about nine kernel calls, each waiting
for the MLX ops before it);
``mtpnb.head.MTPHead.draft_steps_kernel`` builds it where it applies.

``install(module)`` swaps float32 ``nn.Linear`` layers and a tied ``nn.Embedding``'s
``as_linear`` to the kernel-aware subclasses below (a class change on the existing objects), which take
the kernel for inputs of at most 8 rows on the CPU device and are exactly MLX's layers otherwise;
``linear(x, w)`` is the same choice for a bare weight (the head's draft vocabulary). A layer whose
float32 weights all are bfloat16 numbers (a bf16 checkpoint, up-cast at load) keeps a bf16 copy for the
kernel beside MLX's float32 one (which prefills and longer inputs use): the same sums at half the bytes
read, for half the float32 weights' size in memory.
MTPNB_NO_CPU_KERNEL=1 turns it off; MTPNB_CPU_THREADS sets its threads (default: the CPUs this
process may use, at most 4); their spin before sleeping is short (OPENMP_ENV) unless GOMP_SPINCOUNT or
OMP_WAIT_POLICY says otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

OPT_OUT_ENV = "MTPNB_NO_CPU_KERNEL"
THREADS_ENV = "MTPNB_CPU_THREADS"
SOURCE = Path(__file__).resolve().parent / "kernel_sources" / "verify_cpu.c"
# Tried in order: a compiler without -march=native (older GCC on some ARM) or without OpenMP (clang without
# libomp) still gets a working library, with narrower vectors or one thread.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3",))
LINK_FLAGS = ("-shared", "-fPIC")
MAX_ROWS = 8

_lock = threading.Lock()
_state: dict = {}  # "library": the loaded CDLL or None; "reason": why not; "path": the .so


def cache_dir() -> Path:
    return Path(os.environ.get("MTPNB_CACHE_DIR") or Path.home() / ".cache" / "mtpnb")


def _cpu_identity() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout


def _build() -> Path:
    """Compile the kernel (or find it in the cache): the library's path. Raises with the reason."""
    cc = os.environ.get("CC", "cc")
    try:
        version = _compiler_version(cc)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({cc}: {e.__class__.__name__}); install gcc or set CC") from None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, repr(FLAG_SETS).encode(), version.encode(),
                                     _cpu_identity().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"verify_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for flags in FLAG_SETS:
            done = subprocess.run([cc, *flags, *LINK_FLAGS, str(SOURCE), "-lm", "-o", tmp], capture_output=True,
                                  text=True, timeout=120)
            if not done.returncode:
                break
        else:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {last}")
        os.replace(tmp, target)  # atomic: another process compiling at once finds a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# libgomp's threads spin at the end of a parallel loop (GOMP_SPINCOUNT, 300000 by default) before they
# sleep. When other processes hold the CPUs, the spinning thread keeps a core from the descheduled peer it
# waits for: on 2 cores with two busy processes beside it, a decode step's matmuls took 14 ms instead of
# 2.4 (and a whole quality evaluation several times as long). A short spin costs nothing on an idle
# machine (the next call follows within microseconds: 0.83 ms against 0.84-1.18 for the same matmuls).
# libgomp reads it when it loads, so it is set before the library is; a value of the user's own wins.
OPENMP_ENV = {"GOMP_SPINCOUNT": "1000"}


def _load(path: Path) -> ctypes.CDLL:
    if "OMP_WAIT_POLICY" not in os.environ:
        for key, value in OPENMP_ENV.items():
            os.environ.setdefault(key, value)
    lib = ctypes.CDLL(str(path))
    for matmul in (lib.mtpnb_small_matmul, lib.mtpnb_small_matmul_bf16):
        matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
        matmul.restype = ctypes.c_int
    lib.mtpnb_gated_delta.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 5
    lib.mtpnb_gated_delta.restype = ctypes.c_int
    lib.mtpnb_qwen_head_steps.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
                                          + [ctypes.c_void_p] + [ctypes.c_float] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
                                          + [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_void_p]
                                          + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int])
    lib.mtpnb_qwen_head_steps.restype = ctypes.c_int
    if lib.mtpnb_max_rows() != MAX_ROWS:
        raise RuntimeError(f"the library takes {lib.mtpnb_max_rows()} rows, this module {MAX_ROWS}")
    return lib


@functools.lru_cache(maxsize=None)
def threads() -> int:
    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(available, 4))


def _call(lib, x: np.ndarray, w: np.ndarray, w_address: int | None = None) -> np.ndarray:
    """x [m, k] float32 by w [n, k]: float32, or the bfloat16 halves (uint16) that bf16_halves gives."""
    m, k = x.shape
    y = np.empty((m, w.shape[0]), dtype=np.float32)
    matmul = lib.mtpnb_small_matmul_bf16 if w.dtype == np.uint16 else lib.mtpnb_small_matmul
    if matmul(x.ctypes.data, w_address or w.ctypes.data, y.ctypes.data, m, w.shape[0], k, threads()):
        raise ValueError(f"small_matmul: {m} rows x {k} by {w.shape}")
    return y


def bf16_halves(w: np.ndarray) -> np.ndarray | None:
    """The upper 16 bits of each float32 of w (uint16: the bfloat16 numbers), if the lower ones are all
    zero, so that the bf16 matmul reads the same weights at half the bytes; else None."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    return (bits >> 16).astype(np.uint16)


def _gated_delta_call(lib, q, k, v, g, beta, state0):
    """numpy in (B = 1, q/k heads repeated to v's), numpy out: y [1, T, H, Dv] and the last state
    [1, H, Dv, Dk]."""
    _, T, H, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v, g, beta, state0 = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v, g, beta, state0))
    y = np.empty((1, T, H, Dv), dtype=np.float32)
    state = np.empty((1, H, Dv, Dk), dtype=np.float32)
    if lib.mtpnb_gated_delta(q.ctypes.data, k.ctypes.data, v.ctypes.data, g.ctypes.data, beta.ctypes.data,
                             state0.ctypes.data, y.ctypes.data, state.ctypes.data, T, H, Dk, Dv, threads()):
        raise ValueError(f"gated_delta: sizes T={T} H={H} Dk={Dk} Dv={Dv}")
    return y, state


def _self_check(lib) -> str | None:
    """None if the library matches MLX's float32 matmul on random data, else what is wrong."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((301, 173), dtype=np.float32)  # odd N, K not a multiple of any vector width
    x = rng.standard_normal((MAX_ROWS, 173), dtype=np.float32)
    want = np.asarray(mx.array(x) @ mx.array(w).T)
    for m in range(1, MAX_ROWS + 1):
        got = _call(lib, x[:m], w)
        if not np.allclose(got, want[:m], rtol=1e-4, atol=1e-4):
            return f"off MLX's matmul by {np.abs(got - want[:m]).max():.3g} at {m} rows"
        if not np.array_equal(got[-1:], _call(lib, x[m - 1 : m], w)):
            return f"a row's result depends on the batch ({m} rows)"
        w_bf16 = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)  # float32s that are bfloat16 numbers
        if not np.array_equal(_call(lib, x[:m], bf16_halves(w_bf16)), _call(lib, x[:m], w_bf16)):
            return f"the bfloat16 weights' sums differ from the float32 ones' ({m} rows)"
    from mlx_lm.models.gated_delta import gated_delta_ops

    T, H, Dk, Dv = 5, 3, 37, 21
    q, k = (rng.standard_normal((1, T, H, Dk), dtype=np.float32) * 0.3 for _ in range(2))
    v = rng.standard_normal((1, T, H, Dv), dtype=np.float32)
    g, beta = (rng.uniform(0.2, 1.0, (1, T, H)).astype(np.float32) for _ in range(2))
    state0 = rng.standard_normal((1, H, Dv, Dk), dtype=np.float32)
    y_want, s_want = (np.asarray(a) for a in gated_delta_ops(*map(mx.array, (q, k, v, g, beta, state0))))
    y, state = _gated_delta_call(lib, q, k, v, g, beta, state0)
    if not (np.allclose(y, y_want, rtol=1e-4, atol=1e-4) and np.allclose(state, s_want, rtol=1e-4, atol=1e-4)):
        return f"the Gated DeltaNet recurrence is off mlx-lm's by {np.abs(y - y_want).max():.3g}"
    s = state0
    for t in range(T):
        y_t, s = _gated_delta_call(lib, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                   beta[:, t : t + 1], s)
        if not np.array_equal(y_t, y[:, t : t + 1]):
            return "a step of the Gated DeltaNet recurrence depends on the number of steps"
    if not np.array_equal(s, state):
        return "the Gated DeltaNet recurrence's state depends on the number of steps"
    return None


def library():
    """The checked kernel library, or None (and the reason in status()) where it cannot be used."""
    if "library" in _state:  # every matmul asks: no lock once it is settled
        return _state["library"]
    with _lock:
        if "library" not in _state:
            lib, reason, path = None, None, None
            if os.environ.get(OPT_OUT_ENV):  # asked for: no warning
                reason = f"{OPT_OUT_ENV} is set"
            else:
                try:
                    path = _build()
                    lib = _load(path)
                    reason = _self_check(lib)
                except Exception as e:  # no compiler, a failed build, a library that will not load
                    reason = str(e) or e.__class__.__name__
                if reason:
                    lib = None
                    warnings.warn(f"mtpnb: the CPU verify kernels are not used ({reason}); MLX's ops run "
                                  f"instead, and MTP gains less on this CPU", RuntimeWarning, stacklevel=3)
            _state.update(reason=reason, path=str(path) if path else None)
            _state["library"] = lib  # last: the lock-free read above sees a settled state
        return _state["library"]


def status() -> dict:
    """Whether the kernel is in use, and if not why; where the library is; its threads."""
    lib = library()
    return {"enabled": lib is not None, "reason": _state["reason"], "path": _state["path"],
            "threads": threads() if lib is not None else None}


def _applies(x: mx.array, w: mx.array) -> bool:
    return (x.dtype == mx.float32 and w.dtype == mx.float32 and w.ndim == 2 and x.ndim >= 1
            and 0 < x.size // max(x.shape[-1], 1) <= MAX_ROWS and x.shape[-1] == w.shape[1]
            and mx.default_device().type == mx.cpu)


def linear(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T: with the kernel where it applies (float32, at most 8 rows, the CPU device), else MLX's
    matmul."""
    return _kernel_matmul(x, w) if _applies(x, w) else x @ w.T


def _kernel_matmul(x: mx.array, w: mx.array, w_host: tuple | None = None) -> mx.array:
    """x @ w.T through the kernel, for an (x, w) that _applies to; MLX's matmul where the library is
    missing or x has no numbers yet. `w_host`: (w's rows as numpy, their address), kept by the caller."""
    if (lib := library()) is None:
        return x @ w.T
    try:
        mx.eval(x)
    except ValueError:  # inside mx.compile or another transformation: no numbers to hand over
        return x @ w.T
    rows = np.ascontiguousarray(np.asarray(x).reshape(-1, x.shape[-1]))
    w_np, w_address = (_row_major(w), None) if w_host is None else w_host
    return mx.array(_call(lib, rows, w_np, w_address)).reshape(*x.shape[:-1], w.shape[0])


def _row_major(w: mx.array) -> np.ndarray:
    """w's memory as numpy rows, as the kernel reads it (a transposed or sliced w is copied)."""
    return np.ascontiguousarray(np.asarray(w))


def usable() -> bool:
    """Whether the kernels run here: the CPU device, and a checked library."""
    return mx.default_device().type == mx.cpu and library() is not None


def gated_delta_applies(q: mx.array, v: mx.array, g: mx.array, state: mx.array) -> bool:
    """Whether gated_delta takes these: one sequence, float32, a scalar gate per head, the CPU."""
    return (q.shape[0] == 1 and g.ndim == 3 and all(a.dtype == mx.float32 for a in (q, v, g, state))
            and usable())


def gated_delta(q, k, v, g, beta, state):
    """mlx-lm's gated_delta_ops (q, k [1, T, H, Dk] with H the value heads, v [1, T, H, Dv], g and beta
    [1, T, H], state [1, H, Dv, Dk]) in one C call: -> (y, last state, state_after), where
    state_after(n) runs the first n steps again from the same numbers: bitwise the state this call
    reached after them (what a rollback keeps). Writing every step's state out instead, in case a
    rollback wants one, cost a verify of 4 tokens on the default model 0.85 of 10 ms; running the kept
    steps again costs only the verifies that a rollback follows. Check gated_delta_applies first."""
    mx.eval(q, k, v, g, beta, state)
    inputs = [np.asarray(a) for a in (q, k, v, g, beta)]
    state0 = np.asarray(state)
    y, last = _gated_delta_call(library(), *inputs, state0)

    def state_after(steps: int) -> mx.array:
        return mx.array(_gated_delta_call(library(), *(a[:, :steps] for a in inputs), state0)[1])

    return mx.array(y), mx.array(last), state_after


class HeadDraftSteps:
    """A one-layer Qwen3.5 MTP head's draft steps in C (verify_cpu.c's mtpnb_qwen_head_steps): through
    MLX each step waits on about nine kernel calls. `weights` in the C function's order, as MLX arrays
    (kept: the calls read their memory); `vocab`: the token ids of the draft rows (None: row i is token
    i); `dims`: H, heads, KV heads, head dim, RoPE's rotated dims, MLP width, draft rows. Where every
    matrix's float32 values are bfloat16 numbers (a bf16 checkpoint), the C function reads the matrices as
    bf16: the same numbers at half the bytes, and a draft step's cost is those bytes."""

    MATRICES = (3, 5, 6, 7, 10, 12, 13, 14, 16)  # fc, q, k, v, o, gate, up, down, draft: verify_cpu.c's W_*

    def __init__(self, weights: list, vocab: mx.array | None, dims: tuple, eps: float, rope_base: float):
        self._weights = weights
        self._host = [_row_major(w) for w in weights]
        halves = [bf16_halves(self._host[i]) for i in self.MATRICES]
        self.bf16 = all(h is not None for h in halves)
        if self.bf16:
            for i, h in zip(self.MATRICES, halves):
                self._host[i] = h
        self._pointers = (ctypes.c_void_p * len(self._host))(*[h.ctypes.data for h in self._host])
        self._vocab = None if vocab is None else np.ascontiguousarray(np.asarray(vocab), dtype=np.int32)
        self._dims = (ctypes.c_int * len(dims))(*dims)
        self._eps, self._log_base = eps, math.log(rope_base)
        self._hidden_size, self._kv_heads, self._head_dim, self._rows = dims[0], dims[2], dims[3], dims[-1]
        self._context = (None, 0, None, None)  # a generation's vocabulary, its added count, what the C reads of it

    def round(self, cache: KVCache, hidden: mx.array, tokens: list[int], steps: int,
              vocabulary=None) -> "DraftRound":
        """One round of `steps` draft steps: step 0 over the positions the head has not read yet (hidden
        [1, n, H], the token after each), whose K and V rows enter `cache` (the head's) as the MLX head's
        would; the later steps' rows never do (the verify would trim them). `vocabulary`: a generation's
        mtpnb.model.DraftVocabulary, whose context rows the drafts may also come from (None: the rows given)."""
        mx.eval(hidden)
        rows = np.array(np.asarray(hidden.astype(mx.float32)).reshape(-1, self._hidden_size))
        vocab, context_rows = (self._vocab, None) if vocabulary is None else self._context_of(vocabulary)
        return DraftRound(self, cache, rows, np.array(tokens, dtype=np.int32), steps, vocab, context_rows)

    def _context_of(self, vocabulary) -> tuple[np.ndarray, np.ndarray | None]:
        """Every column's token id (int32) and the added rows as the shortlist's are read (float32, or the
        bf16 halves: a bf16 checkpoint's rows are bf16 numbers), kept until tokens join (one generation runs
        at a time per model)."""
        kept, count, ids, rows = self._context
        if kept is not vocabulary or count != len(vocabulary.added):
            ids, rows = np.asarray(vocabulary.ids, dtype=np.int32), vocabulary.context_rows()
            if rows is not None:  # rows of the output layer the shortlist's halves came from: exact in bf16 too
                rows = bf16_halves(np.asarray(rows)) if self.bf16 else np.ascontiguousarray(rows, dtype=np.float32)
            self._context = (vocabulary, len(vocabulary.added), ids, rows)
        return ids, rows


class DraftRound:
    """One round's draft steps (HeadDraftSteps.round), all in one call: greedy, or sampled."""

    def __init__(self, kernel: HeadDraftSteps, cache: KVCache, hidden: np.ndarray, tokens: np.ndarray, steps: int,
                 vocab: np.ndarray | None, context_rows: np.ndarray | None):
        self._kernel, self._cache, self._hidden, self._tokens, self._steps = kernel, cache, hidden, tokens, steps
        self._vocab, self._context_rows = vocab, context_rows  # every column's token id; the rows after the kernel's

    def greedy(self) -> tuple[mx.array, mx.array]:
        """-> (each draft's row among the draft rows [steps], the steps' logits [steps, draft rows])."""
        return self._run(None, None)

    def sampled(self, temperature: float, top_p: float, min_p: float, top_k: int,
                uniforms: mx.array) -> tuple[mx.array, mx.array]:
        """Each step's draft drawn (inverse CDF at uniforms[step], in [0, 1)) from its logits processed as
        mtpnb.sampling.Sampling does: -> (each draft's row [steps], the distributions they were drawn
        from as normalized log-probabilities [steps, draft rows], -inf where filtered: what the
        acceptance reads as q)."""
        mx.eval(uniforms)
        settings = np.array([temperature, top_p, min_p, top_k], dtype=np.float32)
        return self._run(settings, np.ascontiguousarray(np.asarray(uniforms), dtype=np.float32).reshape(self._steps))

    def _run(self, sampling: np.ndarray | None, uniforms: np.ndarray | None) -> tuple[mx.array, mx.array]:
        k, cache, n, steps = self._kernel, self._cache, len(self._tokens), self._steps
        # The round's K, V rows: step 0's (copied into the cache after the call), then one per later step.
        rows = np.empty((2, n + steps - 1, k._kv_heads * k._head_dim), dtype=np.float32)
        g = np.empty(k._hidden_size, dtype=np.float32)  # each step's output: the next one's input
        keys = values = None
        if cache.keys is not None:
            mx.eval(cache.keys, cache.values)
            keys, values = (np.ascontiguousarray(np.asarray(a)[0]) for a in (cache.keys, cache.values))
        columns = np.empty(steps, dtype=np.int32)
        context = 0 if self._context_rows is None else len(self._context_rows)
        width = k._rows if self._vocab is None else len(self._vocab)  # the context rows' room included
        logits = np.empty((steps, width), dtype=np.float32)
        if library().mtpnb_qwen_head_steps(
                k._pointers, k.bf16, None if self._vocab is None else self._vocab.ctypes.data,
                None if self._context_rows is None else self._context_rows.ctypes.data, context, width, k._dims,
                k._eps, k._log_base,
                None if keys is None else keys.ctypes.data, None if values is None else values.ctypes.data,
                0 if keys is None else keys.shape[1], cache.offset, rows[0].ctypes.data, rows[1].ctypes.data,
                self._hidden.ctypes.data, self._tokens.ctypes.data, n, g.ctypes.data, steps,
                None if sampling is None else sampling.ctypes.data, None if uniforms is None else uniforms.ctypes.data,
                columns.ctypes.data, logits.ctypes.data, threads()):
            raise ValueError(f"qwen_head_steps: sizes {list(k._dims)}, cache {None if keys is None else keys.shape}, "
                             f"offset {cache.offset}")
        # step 0's rows [1, KV heads, n, head dim] enter the cache, as the MLX head's attention adds them
        cache.update_and_fetch(*(mx.array(r[:n].reshape(n, k._kv_heads, k._head_dim).transpose(1, 0, 2))[None]
                                 for r in rows))
        return mx.array(columns), mx.array(logits)


def _host_weight(module) -> tuple:
    """The layer's weight as the kernel reads it, and its address, kept until the weight is replaced:
    its bfloat16 halves where its float32 values all are bf16 numbers (a verify's cost is these bytes),
    else its numpy rows (a view of the same memory unless it is strided)."""
    kept = getattr(module, "_host_weight_of", None)
    if kept is None or kept[0] is not module.weight:
        view = _row_major(module.weight)
        halves = bf16_halves(view)
        view = view if halves is None else halves
        kept = (module.weight, (view, view.ctypes.data))
        object.__setattr__(module, "_host_weight_of", kept)
    return kept[1]


class SmallBatchLinear(nn.Linear):
    """nn.Linear whose matmul takes the CPU kernel for inputs of at most 8 rows."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _applies(x, self.weight):
            return super().__call__(x)
        y = _kernel_matmul(x, self.weight, _host_weight(self))
        return y + self["bias"] if "bias" in self else y


class SmallBatchEmbedding(nn.Embedding):
    """nn.Embedding whose as_linear (a tied output layer) takes the CPU kernel for at most 8 rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _applies(x, self.weight):
            return super().as_linear(x)
        return _kernel_matmul(x, self.weight, _host_weight(self))


_SWAPS = {nn.Linear: SmallBatchLinear, nn.Embedding: SmallBatchEmbedding}


def install(*modules) -> int:
    """Swap the float32 linear (and embedding) layers of `modules` to the kernel-aware classes, if the
    kernel can be used here: how many layers were swapped (0 where it cannot; status() says why)."""
    if not usable():
        return 0
    swapped = 0
    for module in modules:
        if module is None:
            continue
        for _, layer in module.named_modules():
            new = _SWAPS.get(type(layer))
            if new is not None and layer.weight.dtype == mx.float32:
                layer.__class__ = new
                _host_weight(layer)  # at load, not in the first verify
                swapped += 1
    return swapped


def uninstall(*modules) -> int:
    """Back to MLX's own layers: how many were swapped back."""
    back = {new: old for old, new in _SWAPS.items()}
    swapped = 0
    for module in modules:
        if module is None:
            continue
        for _, layer in module.named_modules():
            if type(layer) in back:
                layer.__class__ = back[type(layer)]
                layer.__dict__.pop("_host_weight_of", None)
                swapped += 1
    return swapped


def describe(*modules) -> str | None:
    """One line on the CPU kernels for a model (None off the CPU device)."""
    if mx.default_device().type != mx.cpu:
        return None
    if not usable():
        return f"off ({_state['reason']})"
    layers = [m for module in modules if module is not None for m in module.modules() if type(m) in _SWAPS.values()]
    copies = [kept for kept in (_host_weight(m)[0] for m in layers) if kept.dtype == np.uint16]
    read_as = ""
    if copies:
        which = "" if len(copies) == len(layers) else f"{len(copies)} "
        read_as = f" ({which}read as bfloat16: {sum(c.nbytes for c in copies) / 1e6:.0f} MB of copies)"
    return (f"on: {len(layers)} float32 layers{read_as} of at most {MAX_ROWS} rows and the Gated DeltaNet recurrence, "
            f"{threads()} threads")
