"""One call to stream a generation into a notebook: what the `%%mtp` magics build on.

    view, generation = stream_to_widget(model, prompt, depth=3)   # non-blocking; display(view)
    result = show_generation(model, prompt, depth=3)              # displays, blocks, returns Result
    base, mtp = show_comparison(model, prompt, depth=3)           # depth 0 | depth 3, with the speedup

Bad parameters raise MTPNBError (one line) before anything is displayed. Errors while decoding are
shown inside the widget. The kernel's interrupt button stops a blocking call after the current
verify step, and the partial Result is returned.
"""

from __future__ import annotations

import ipywidgets as widgets

from ..events import Result
from .charts import LiveCharts
from .comparison import Comparison
from .runner import Generation
from .token_stream import LAYOUT_CLASS, TokenStream


class GenerationView(widgets.VBox):
    """A TokenStream (with its metrics line), and LiveCharts below it when asked for. Its static
    HTML and text renderings are the TokenStream's, so a saved notebook shows the generated text."""

    def __init__(self, *, charts: bool = False, label: str = ""):
        self.stream = TokenStream(label=label)
        self.charts = LiveCharts() if charts else None
        super().__init__([self.stream] + ([self.charts] if charts else []))
        self.add_class(LAYOUT_CLASS)

    @property
    def sinks(self) -> list:
        return [self.stream] + ([self.charts] if self.charts is not None else [])

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        data["text/plain"] = self.stream.to_text()
        data["text/html"] = self.stream.to_html()
        return data


def stream_to_widget(model, prompt, *, charts: bool = False, label: str = "", **params
                     ) -> tuple[GenerationView, Generation]:
    """Start streaming a generation into a new view; return (view, generation) at once.

    params: as for `model.stream` (depth, max_tokens, temperature, top_p, top_k, min_p, seed, stop,
    chat, reasoning). The caller displays `view`; `generation.wait()` returns the Result,
    `generation.stop()` cancels after the current verify step."""
    view = GenerationView(charts=charts, label=label)
    generation = Generation(model, prompt, params, view.sinks)  # MTPNBError here for bad params
    return view, generation.start()


def show_generation(model, prompt, *, charts: bool = False, label: str = "", **params) -> Result | None:
    """Display a streaming generation and block until it ends; return its Result (partial if
    interrupted; None if it failed before its first token: the error is shown in the widget)."""
    from IPython.display import display

    view, generation = stream_to_widget(model, prompt, charts=charts, label=label, **params)
    handle = display(view.stream, display_id=True)
    charts = display(view.charts, display_id=True) if view.charts is not None else None
    result = generation.wait()
    if handle is not None:  # re-send the token view's output: its static HTML / text now hold the result
        handle.update(view.stream)
    if charts is not None:  # the finished charts as plotly's own output: a saved notebook keeps them as they are
        charts.update(view.charts.to_mimebundle(), raw=True)
    return result


def show_comparison(model, prompt, *, depth: int = 3, **params) -> tuple[Result, Result] | None:
    """Display depth 0 and depth `depth` side by side with the speedup; block until both end.
    Return (depth-0 result, depth-D result), or None if stopped or failed (shown in the widget).
    `Comparison.speedup` / `mtpnb.widgets.speedup(base, mtp)` give the figures."""
    from IPython.display import display

    comparison = Comparison(model)
    comparison.run(prompt, depth=depth, **params)
    handle = display(comparison, display_id=True)
    results = comparison.wait()
    if handle is not None:  # as in show_generation: the static renderings now hold both runs
        handle.update(comparison)
    return results
