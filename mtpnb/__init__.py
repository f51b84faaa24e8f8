"""mtpnb: multi-token-prediction speculative decoding on MLX, seen and used from Jupyter.

    import mtpnb
    model = mtpnb.load()                      # the embedded default model (or a folder / hub repo)
    result = model.generate("def fibonacci(n):", depth=3, max_tokens=64)
    print(result.text, result.metrics.summary())
"""

import importlib

from .blas import load_openblas

# First, before anything imports MLX: on Linux, OpenBLAS in place of the reference BLAS that the
# mlx-cpu wheel bundles (mtpnb.blas says why; MTPNB_NO_OPENBLAS=1 opts out).
load_openblas()

from .errors import MTPNBError  # noqa: E402
from .events import TOKEN_KINDS, Done, Metrics, Result, StepEvent, TokenEvent  # noqa: E402

__version__ = "0.1.0"

# Loaded on first use, so that `import mtpnb` (and every `mtpnb` command) stays light: the engine
# brings in MLX, mlx-lm and transformers; the widgets ipywidgets and plotly; the client nothing.
_LAZY = {
    "load": "loading", "save": "loading", "Model": "model", "Engine": "engine",
    "GenerationParams": "params", "connect": "remote", "Playground": "widgets", "PromptCache": "prompt_cache",
}

__all__ = ["MTPNBError", "Result", "Metrics", "TokenEvent", "StepEvent", "Done", "TOKEN_KINDS", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtpnb' has no attribute {name!r}")


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
