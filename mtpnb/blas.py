"""Which BLAS MLX's CPU backend calls, and the OpenBLAS remedy on Linux.

The `mlx-cpu` wheel for Linux bundles the reference (netlib) BLAS: every float32 matmul runs at a few
GFLOP/s whatever its batch, so verifying D+1 tokens costs ~(D+1)x one token and MTP cannot pay off.
Debian/Ubuntu's OpenBLAS, preloaded, takes over the `cblas_*` symbols MLX calls (the preload comes
first in the dynamic linker's global scope, before the wheel's own copy):

    apt-get install libopenblas0-pthread
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python ...

`blas_info()` says which library actually provides the symbols in this process (the real library path,
found with dlsym/dladdr, cross-checked against /proc/self/maps and, optionally, a matmul timing), and
gives a one-line message with the remedy. `reexec_with_openblas()` is the launcher helper the `mtpnb`
console command calls first: it re-executes the same command with the preload when OpenBLAS is
installed and not yet preloaded (opt out with MTPNB_NO_OPENBLAS=1).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

OPT_OUT_ENV = "MTPNB_NO_OPENBLAS"
REEXEC_GUARD_ENV = "MTPNB_OPENBLAS_REEXEC"  # set in the re-executed process: never loop
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

    Returns {"kind": one of KINDS, "library": path, "preloaded": bool, "openblas_installed": path|None,
    "openblas_config": str|None, "threads": OpenBLAS threads|None, "ld_preload": str, "message": one line,
    "gflops": {M: GFLOP/s} when timing=True, "batched_speedup": gflops(64)/gflops(1)}.
    """
    import mlx.core as mx

    with mx.stream(mx.cpu):  # make sure the CPU backend (and its BLAS) is loaded
        mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
    info: dict = {
        "platform": sys.platform,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
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
    if kind == "openblas":
        return f"BLAS: OpenBLAS ({info.get('library')}){timing}: batched verifies are cheap on this CPU"
    if kind == "reference":
        remedy = (
            f"start Python or Jupyter with LD_PRELOAD={info['openblas_installed']} (the `mtpnb` command does "
            f"this itself)"
            if info.get("openblas_installed")
            else f"`{INSTALL_HINT}`, then run with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
        )
        return (
            f"BLAS: the reference (netlib) BLAS bundled with mlx-cpu{timing}: a verify of D+1 tokens costs "
            f"~(D+1)x one token, so MTP barely pays off on this CPU; remedy: {remedy}"
        )
    return f"BLAS: {kind} ({info.get('library')}){timing}"


# -- the launcher -----------------------------------------------------------------------------------
def openblas_reexec_env(environ=None, platform: str | None = None, library: str | None = None) -> dict | None:
    """The environment to re-execute this command with, or None to carry on as is.

    None when: not Linux; MTPNB_NO_OPENBLAS=1; already re-executed once; no OpenBLAS installed; or it
    is already in LD_PRELOAD."""
    environ = dict(os.environ if environ is None else environ)
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return None
    if environ.get(OPT_OUT_ENV, "").strip() not in ("", "0") or environ.get(REEXEC_GUARD_ENV):
        return None
    library = library if library is not None else openblas_path()
    if not library:
        return None
    preload = environ.get("LD_PRELOAD", "")
    if library in preload.replace(":", " ").split():
        return None
    environ["LD_PRELOAD"] = f"{library} {preload}".strip() if preload else library
    environ[REEXEC_GUARD_ENV] = "1"
    return environ


def reexec_command() -> list[str]:
    """This process's command line, to run again: `python -m mod ...`, `python script ...`, `python -c ...`."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return [sys.executable, *argv[1:]]


def reexec_with_openblas() -> None:
    """Re-execute the current command with OpenBLAS preloaded when that helps (see
    `openblas_reexec_env`); returns normally otherwise. Call it first thing in a launcher."""
    env = openblas_reexec_env()
    if env is None:
        return
    argv = reexec_command()
    if not Path(argv[0]).exists():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError:
        return
