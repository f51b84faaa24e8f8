"""mtpnb: multi-token-prediction speculative decoding on MLX, seen and used from Jupyter.

    import mtpnb
    model = mtpnb.load()                      # the embedded default model (or a folder / hub repo)
    result = model.generate("def fibonacci(n):", depth=3, max_tokens=64)
    print(result.text, result.metrics.summary())
"""

from .engine import Engine, GenerationParams
from .errors import MTPNBError
from .events import TOKEN_KINDS, Done, Metrics, Result, StepEvent, TokenEvent
from .loading import load, save
from .model import Model

__version__ = "0.1.0"

__all__ = [
    "load", "save", "connect", "Model", "Engine", "GenerationParams", "MTPNBError",
    "Result", "Metrics", "TokenEvent", "StepEvent", "Done", "TOKEN_KINDS", "Playground",
]


def connect(url, api_key=None, **options):  # lazy: mtpnb.remote (a served model, engine-like)
    from .remote import connect as _connect

    return _connect(url, api_key, **options)


def __getattr__(name):
    # The Jupyter layer loads on first use: `import mtpnb` stays free of ipywidgets and plotly.
    if name == "Playground":
        from .widgets import Playground

        return Playground
    raise AttributeError(f"module 'mtpnb' has no attribute {name!r}")


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
