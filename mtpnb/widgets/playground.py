"""Playground: controls, the token stream, live charts and the depth-0 comparison in one widget.

    import mtpnb
    mtpnb.Playground(model)   # or mtpnb.Playground() for the embedded default model
"""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets as widgets

from ..events import Result
from .charts import LiveCharts
from .comparison import Comparison
from .controls import Controls
from .runner import Generation, describe_error
from .token_stream import LAYOUT_CLASS, TokenStream

DEFAULT_PROMPT = "def fibonacci(n):\n"


class Playground(widgets.VBox):
    """Type a prompt, set depth and sampling, press Generate: tokens stream in coloured by what MTP
    did with them, with live charts; Compare runs the prompt at depth 0 and at depth D side by side.
    Generations run on a background thread, so the controls stay live and Stop works.

    model: an mtpnb.Model (None: `mtpnb.load()`, the embedded default model).
    Other keywords set the controls' initial values: prompt, depth, max_tokens, temperature,
    top_p, top_k, seed.
    """

    def __init__(self, model=None, *, prompt: str = DEFAULT_PROMPT, **defaults):
        if model is None:
            from ..loading import load

            model = load()
        self.model = model
        self.controls = Controls(prompt=prompt, has_mtp=model.has_mtp, **defaults)
        self.stream = TokenStream()
        self.charts = LiveCharts()
        self.comparison = Comparison(model)
        self.tabs = widgets.Tab(
            [widgets.VBox([self.stream, self.charts]), self.comparison],
            titles=("Stream", "Compare"),
        )
        self.generation: Generation | None = None
        self.controls.on_generate(self._guarded(self.generate, self.stream.show_error))
        self.controls.on_compare(self._guarded(self.compare, self.comparison.show_error))
        self.controls.on_stop(self.stop)
        super().__init__([widgets.HTML(_describe_model(model)), self.controls, self.tabs])
        self.add_class(LAYOUT_CLASS)

    def generate(self, prompt=None, **params) -> Generation:
        """Start a generation from the controls' prompt and values (arguments override them)."""
        prompt = self.controls.prompt.value if prompt is None else prompt
        generation = Generation(self.model, prompt, {**self.controls.params(), **params}, [self.stream, self.charts])
        self.tabs.selected_index = 0
        self._run(generation.start, generation.add_done_callback)
        self.generation = generation
        return generation

    def compare(self, prompt=None, **params) -> Comparison:
        """Run the prompt at depth 0 and at the controls' depth, side by side (arguments override)."""
        prompt = self.controls.prompt.value if prompt is None else prompt
        params = {**self.controls.params(), **params}
        depth = params.pop("depth") or self.controls.depth.value
        self.tabs.selected_index = 1
        self._run(lambda: self.comparison.run(prompt, depth=depth, **params), self.comparison.add_done_callback)
        return self.comparison

    def stop(self) -> None:
        """Stop the generation or comparison in progress (after its current verify step)."""
        if self.generation is not None:
            self.generation.stop()
        self.comparison.stop()

    @property
    def result(self) -> Result | None:
        """The Result of the last generation started with Generate (partial if stopped)."""
        return self.generation.result if self.generation is not None else None

    def _run(self, start: Callable[[], object], on_done: Callable) -> None:
        self.controls.set_running(True)
        try:
            start()
        except BaseException:
            self.controls.set_running(False)
            raise
        on_done(lambda _: self.controls.set_running(False))

    @staticmethod
    def _guarded(action: Callable[[], object], show_error: Callable[[str], None]) -> Callable[[], None]:
        """A button handler that shows its errors in the widget (ipywidgets would swallow them)."""
        def handler() -> None:
            try:
                action()
            except Exception as exc:
                show_error(describe_error(exc))

        return handler

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        data["text/plain"] = f"mtpnb Playground for {self.model.name}: run the notebook to use it"
        return data


def _describe_model(model) -> str:
    """One line from model.info(): a local Model's, or the fewer keys of a served one."""
    info = model.info()
    parts = [f"<strong>{html.escape(model.name)}</strong>"]
    if info.get("family"):
        parts.append(html.escape(str(info["family"])))
    if info.get("parameters"):
        parts.append(f"{info['parameters'] / 1e6:.1f}M parameters")
    parts.append("MTP head" if model.has_mtp else "no MTP head: plain decoding only")
    if info.get("dtype"):
        quantization = f", {info['quantization']}" if info.get("quantization") else ""
        parts.append(html.escape(f"{info['dtype']}{quantization}"))
    if info.get("url") or info.get("device"):
        parts.append(html.escape(str(info.get("url") or info["device"])))
    notes = "".join(f"<div style='opacity:.75'>{html.escape(n)}</div>" for n in info.get("notes", []))
    style = "font-size:var(--jp-ui-font-size1,13px);color:var(--jp-ui-font-color1,#222);margin-bottom:4px"
    return f'<div style="{style}">{" · ".join(parts)}{notes}</div>'

