"""Which BLAS MLX's CPU backend calls, and OpenBLAS in its place on Linux.

The `mlx-cpu` wheel for Linux bundles the reference (netlib) BLAS: every float32 matmul runs at a few
GFLOP/s whatever its batch, so verifying D+1 tokens costs ~(D+1)x one token and MTP cannot pay off.
Debian/Ubuntu's OpenBLAS (`apt-get install libopenblas0-pthread`) takes over the `cblas_*` symbols MLX
calls when it sits in the process's global symbol scope before MLX is loaded. `import mtpnb` puts it
there (`load_openblas`, a `ctypes.CDLL(path, RTLD_GLOBAL)`), so any fresh Python, `mtpnb` command or
Jupyter kernel that imports mtpnb before mlx gets it; LD_PRELOAD does the same from outside. Opt out
with MTPNB_NO_OPENBLAS=1; MTPNB_OPENBLAS_PATH names another library.

`blas_info()` says which library actually provides the symbols in this process (the real library path,
found with dlsym/dladdr, cross-checked against /proc/self/maps and, optionally, a matmul timing), how
it got there, and gives a one-line message with the remedy. `warn_once_if_reference_blas()` is the one
line a notebook gets when MLX was imported too early (before mtpnb) to be helped.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

OPT_OUT_ENV = "MTPNB_NO_OPENBLAS"
INSTALL_HINT = "apt-get install libopenblas0-pthread"
# Where Debian/Ubuntu put the OpenBLAS BLAS interface (pthread build first; then the others).
OPENBLAS_CANDIDATES = tuple(
    f"/usr/lib/{arch}/{variant}/libblas.so.3"
    for arch in ("x86_64-linux-gnu", "aarch64-linux-gnu")
    for variant in ("openblas-pthread", "openblas-openmp", "openblas-serial")
)
KINDS = ("openblas", "reference", "accelerate", "mkl", "blis", "none", "unknown")


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def openblas_path() -> str | None:
    """The installed OpenBLAS `libblas.so.3` to preload, if any (MTPNB_OPENBLAS_PATH overrides)."""
    override = os.environ.get("MTPNB_OPENBLAS_PATH")
    if override:
        return override if os.path.exists(override) else None
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


def _global_provider(symbol: str) -> str | None:
    """The file of the library that provides `symbol` in the global lookup scope (LD_PRELOAD, the
    executable and their dependencies): what an RTLD_LOCAL extension like libmlx binds to first."""
    try:
        libdl = ctypes.CDLL(None)
        libdl.dlsym.restype = ctypes.c_void_p
        libdl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        libdl.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        address = libdl.dlsym(None, symbol.encode())  # RTLD_DEFAULT
        if not address:
            return None
        info = _DlInfo()
        if not libdl.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError):
        return None


def _mapped_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line and ".so" in line}
    except OSError:
        return []
    return sorted(paths)


def _classify(path: str | None) -> str:
    if not path:
        return "unknown"
    name = os.path.basename(path).lower()
    if "openblas" in path.lower():
        return "openblas"
    if "mkl" in name:
        return "mkl"
    if "blis" in name:
        return "blis"
    if "accelerate" in path.lower() or "veclib" in path.lower():
        return "accelerate"
    if name.startswith("libblas") or name.startswith("libcblas") or "/blas/" in path:
        return "reference"
    return "unknown"


def _openblas_threads() -> int | None:
    try:
        fn = ctypes.CDLL(None).openblas_get_num_threads
        fn.restype = ctypes.c_int
        return int(fn())
    except (OSError, AttributeError):
        return None


def _openblas_config() -> str | None:
    try:
        lib = ctypes.CDLL(None)
        fn = lib.openblas_get_config
        fn.restype = ctypes.c_char_p
        return fn().decode().strip()
    except (OSError, AttributeError):
        return None


def matmul_gflops(sizes=(1, 64), n: int = 1024, repeats: int = 5) -> dict[int, float]:
    """float32 [M, n] @ [n, n] GFLOP/s on the CPU device, median of `repeats`, per M."""
    import mlx.core as mx

    out = {}
    with mx.stream(mx.cpu):
        w = mx.random.normal((n, n))
        for m in sizes:
            x = mx.random.normal((m, n))
            mx.eval(w, x, x @ w)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                mx.eval(x @ w)
                times.append(time.perf_counter() - t)
            times.sort()
            out[m] = 2 * m * n * n / times[len(times) // 2] / 1e9
    return out


def blas_info(timing: bool = False) -> dict:
    """Which BLAS MLX's CPU backend uses in this process, and what to do about it.

    Returns {"kind": one of KINDS, "library": path, "preloaded": bool (a BLAS in the global scope ahead of
    MLX's own), "loaded_by": "in-process" (by `import mtpnb`) | "LD_PRELOAD" | "already loaded" | None,
    "not_loaded_because": str|None, "openblas_installed": path|None,
    "openblas_config": str|None, "threads": OpenBLAS threads|None, "ld_preload": str, "message": one line,
    "gflops": {M: GFLOP/s} when timing=True, "batched_speedup": gflops(64)/gflops(1)}.
    """
    import mlx.core as mx

    with mx.stream(mx.cpu):  # make sure the CPU backend (and its BLAS) is loaded
        mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
    info: dict = {
        "platform": sys.platform,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "loaded_by": _loaded_by,
        "not_loaded_because": _not_loaded_because,
        "openblas_installed": openblas_path() if sys.platform.startswith("linux") else None,
    }
    if sys.platform == "darwin":
        info.update(kind="accelerate", library="Accelerate.framework", preloaded=False, openblas_config=None,
                    threads=None)
    else:
        provider = _global_provider("cblas_sgemm")
        if provider:  # a preloaded (or globally loaded) BLAS overrides MLX's bundled one
            kind = "openblas" if _openblas_config() or "openblas" in provider.lower() else _classify(provider)
            info.update(kind=kind, library=provider, preloaded=True)
        else:
            bundled = [p for p in _mapped_libraries() if _classify(p) != "unknown" and "lapack" not in p]
            mlx_own = [p for p in bundled if "mlx" in p.lower()] or bundled
            info.update(kind=_classify(mlx_own[0]) if mlx_own else "none",
                        library=mlx_own[0] if mlx_own else None, preloaded=False)
        info["openblas_config"] = _openblas_config() if info["kind"] == "openblas" else None
        info["threads"] = _openblas_threads() if info["kind"] == "openblas" else None
    if timing:
        gflops = matmul_gflops()
        info["gflops"] = {str(k): round(v, 2) for k, v in gflops.items()}
        info["batched_speedup"] = round(gflops[64] / gflops[1], 2) if gflops.get(1) else None
    info["message"] = blas_message(info)
    return info


def blas_message(info: dict) -> str:
    kind = info.get("kind")
    timing = ""
    if info.get("gflops"):
        g = info["gflops"]
        timing = f" (float32 matmul {g.get('1', 0):.0f} GFLOP/s at 1 row, {g.get('64', 0):.0f} at 64)"
    if kind == "accelerate":
        return "BLAS: Apple Accelerate (MLX on macOS)" + timing
    how = {"in-process": "loaded in-process by `import mtpnb`", "LD_PRELOAD": "preloaded with LD_PRELOAD"}.get(
        info.get("loaded_by") or "", "loaded before MLX")
    if kind == "openblas":
        return f"BLAS: OpenBLAS ({info.get('library')}, {how}){timing}: batched verifies are cheap on this CPU"
    if kind == "reference":
        why = info.get("not_loaded_because")
        if info.get("openblas_installed"):
            remedy = ("restart Python (or the kernel) and `import mtpnb` before anything imports mlx"
                      if why == "MLX was imported before mtpnb" else
                      f"unset {OPT_OUT_ENV}" if why and why.startswith(OPT_OUT_ENV) else
                      f"`import mtpnb` before mlx, or LD_PRELOAD={info['openblas_installed']}")
        else:
            remedy = f"`{INSTALL_HINT}`, then restart Python (or the kernel); `import mtpnb` loads it"
        return (
            f"BLAS: the reference (netlib) BLAS bundled with mlx-cpu{timing}"
            f"{f' ({why})' if why else ''}: a verify of D+1 tokens costs ~(D+1)x one token, so MTP barely pays "
            f"off on this CPU; remedy: {remedy}"
        )
    return f"BLAS: {kind} ({info.get('library')}){timing}"


# -- the in-process load ------------------------------------------------------------------------------
# How OpenBLAS got into this process (set by load_openblas, which `import mtpnb` calls first thing):
# "in-process" (loaded by `import mtpnb`), "LD_PRELOAD", or None; and why not, when it did not.
_loaded_by: str | None = None
_not_loaded_because: str | None = None
_warned = False


def load_openblas(environ=None) -> str | None:
    """Load OpenBLAS into the process's global symbol scope before MLX is imported; return how it got
    there ("in-process", "LD_PRELOAD") or None.

    libmlx is loaded RTLD_LOCAL, so its `cblas_*` look-ups search the global scope first (the
    executable, LD_PRELOAD, anything opened RTLD_GLOBAL) and only then the reference BLAS bundled with
    the wheel: a `ctypes.CDLL(path, RTLD_GLOBAL)` made *before* `import mlx.core` wins, one made after
    comes too late for that process. Nothing is done off Linux, with MTPNB_NO_OPENBLAS=1, or when MLX
    is already loaded (the reason is kept for `blas_info`)."""
    global _loaded_by, _not_loaded_because
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return None
    if _global_provider("cblas_sgemm"):  # LD_PRELOAD (or an earlier call) already put a BLAS there
        if _loaded_by is None:
            _loaded_by = "LD_PRELOAD" if environ.get("LD_PRELOAD") else "already loaded"
        return _loaded_by
    if environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
        _not_loaded_because = f"{OPT_OUT_ENV}=1"
        return None
    if "mlx.core" in sys.modules:
        _not_loaded_because = "MLX was imported before mtpnb"
        return None
    library = openblas_path()
    if not library:
        _not_loaded_because = "OpenBLAS is not installed"
        return None
    try:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _not_loaded_because = f"loading {library} failed: {e}"
        return None
    _loaded_by = "in-process"
    return _loaded_by


def reference_blas_warning() -> str | None:
    """One line for a notebook or script that runs MLX on the reference BLAS although this machine
    could do better (None when all is well): what happened and what to do."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
        return None
    if _global_provider("cblas_sgemm") or "mlx.core" not in sys.modules:
        return None
    if _not_loaded_because == "MLX was imported before mtpnb" and openblas_path():
        return ("mtpnb: MLX was imported before mtpnb, so it runs on the slow reference BLAS and MTP cannot pay "
                "off: restart the kernel and `import mtpnb` (or `%load_ext mtpnb`) before anything imports mlx")
    if not openblas_path():
        return (f"mtpnb: MLX runs on the slow reference BLAS and MTP cannot pay off: `{INSTALL_HINT}`, "
                "then restart Python (or the kernel)")
    return None


def warn_once_if_reference_blas(file=None) -> None:
    """Print `reference_blas_warning()` once per process (`%load_ext mtpnb`, `%mtp load`, `mtpnb.load()`)."""
    global _warned
    if _warned:
        return
    message = reference_blas_warning()
    if message:
        _warned = True
        print(message, file=file or sys.stderr, flush=True)
