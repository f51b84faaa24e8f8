"""mtpnb in Jupyter: tokens streaming inline, coloured by what multi-token prediction did with them.

    import mtpnb
    mtpnb.Playground(model)                              # everything in one widget

The parts, usable alone:
    TokenStream       the tokens (anywidget: token_stream.js / .css), legend, metrics line
    LiveCharts        decode tok/s over time, acceptance per draft position, tokens per verify step
    Controls          prompt, depth, MTP on/off, sampling, max tokens, seed, Generate / Stop / Compare
    Comparison        the same prompt at depth 0 and depth D side by side, with the speedup
    Generation        a generation on a background thread feeding any of the above; stop() / wait()

What the magics call (show.py):
    stream_to_widget(model, prompt, **params) -> (view, generation)   non-blocking
    show_generation(model, prompt, **params) -> Result                displays, blocks until done
    show_comparison(model, prompt, depth=3, **params) -> (base, mtp)  displays, blocks until done

What streaming into the widgets costs in decode speed: `python -m mtpnb.widgets.bench`.
"""

from .charts import LiveCharts
from .comparison import Comparison, describe_speedup, speedup
from .controls import Controls
from .playground import Playground
from .runner import Generation
from .show import GenerationView, show_comparison, show_generation, stream_to_widget
from .token_stream import TokenStream

__all__ = [
    "Playground", "TokenStream", "LiveCharts", "Controls", "Comparison", "Generation", "GenerationView",
    "stream_to_widget", "show_generation", "show_comparison", "speedup", "describe_speedup",
]
