"""Controls: the prompt and the generation parameters, with Generate / Stop / Compare buttons.

A change takes effect at the next generation: the parameters are read when Generate is pressed.

    controls = Controls(has_mtp=model.has_mtp)
    controls.on_generate(lambda: model.stream(controls.prompt.value, **controls.params()))
    controls.on_stop(lambda: ...)
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets

from ..params import MAX_DEPTH
from ..errors import MTPNBError

_WIDE = {"description_width": "88px"}


class Controls(widgets.VBox):
    """The prompt box, depth / MTP on-off, sampling (temperature, top-p, top-k), max tokens, seed,
    and the Generate, Stop and Compare buttons."""

    def __init__(self, *, prompt: str = "", depth: int = 3, has_mtp: bool = True, max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = 0):
        self.prompt = widgets.Textarea(
            value=prompt, placeholder="Prompt", rows=4, layout=widgets.Layout(width="100%"),
        )
        self.mtp = widgets.ToggleButton(
            value=has_mtp and depth > 0, description="MTP", icon="forward", disabled=not has_mtp,
            tooltip="draft with the MTP head" if has_mtp else "this model has no MTP head: plain decoding only",
            layout=widgets.Layout(width="80px"),
        )
        self.depth = widgets.IntSlider(
            value=max(depth, 1), min=1, max=MAX_DEPTH, description="depth", style=_WIDE,
            disabled=not self.mtp.value, tooltip="drafts per verify step",
        )
        self.temperature = widgets.FloatSlider(
            value=temperature, min=0.0, max=2.0, step=0.05, description="temperature", style=_WIDE,
            tooltip="0 = greedy",
        )
        self.top_p = widgets.FloatSlider(
            value=top_p, min=0.05, max=1.0, step=0.05, description="top-p", style=_WIDE, tooltip="1 = off",
        )
        self.top_k = widgets.BoundedIntText(
            value=top_k, min=0, max=1_000_000, description="top-k", style=_WIDE, tooltip="0 = off",
            layout=widgets.Layout(width="180px"),
        )
        self.max_tokens = widgets.BoundedIntText(
            value=max_tokens, min=1, max=100_000, description="max tokens", style=_WIDE,
            layout=widgets.Layout(width="180px"),
        )
        self.seed = widgets.Text(
            value="" if seed is None else str(seed), placeholder="random", description="seed", style=_WIDE,
            tooltip="a whole number, or empty for a random seed", layout=widgets.Layout(width="180px"),
        )
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.compare_button = widgets.Button(
            description="Compare with depth 0", icon="balance-scale", disabled=not has_mtp,
            tooltip="the same prompt at depth 0 and at this depth, side by side",
            layout=widgets.Layout(width="190px"),
        )
        self.mtp.observe(self._on_mtp, names="value")
        hint = widgets.HTML('<span style="opacity:.7">changes apply to the next generation</span>')
        super().__init__([
            self.prompt,
            widgets.HBox([self.mtp, self.depth, self.temperature, self.top_p]),
            widgets.HBox([self.max_tokens, self.top_k, self.seed]),
            widgets.HBox([self.generate_button, self.stop_button, self.compare_button, hint],
                         layout=widgets.Layout(align_items="center")),
        ])

    def _on_mtp(self, change) -> None:
        self.depth.disabled = not change["new"]

    def params(self) -> dict:
        """The generation parameters as set now; MTPNBError for a seed that is not a whole number."""
        seed = self.seed.value.strip()
        if seed and not seed.isdigit():
            raise MTPNBError(f"seed must be a whole number >= 0, or empty for a random seed, not {seed!r}")
        return {
            "depth": self.depth.value if self.mtp.value else 0,
            "temperature": self.temperature.value,
            "top_p": self.top_p.value,
            "top_k": self.top_k.value,
            "max_tokens": self.max_tokens.value,
            "seed": int(seed) if seed else None,
        }

    def set_running(self, running: bool) -> None:
        """Generate and Compare while idle, Stop while a generation runs."""
        self.generate_button.disabled = running
        self.compare_button.disabled = running or self.mtp.disabled
        self.stop_button.disabled = not running

    def on_generate(self, callback: Callable[[], None]) -> None:
        """callback() when Generate is pressed; it reads `prompt.value` and `params()`."""
        self.generate_button.on_click(lambda _: callback())

    def on_compare(self, callback: Callable[[], None]) -> None:
        self.compare_button.on_click(lambda _: callback())

    def on_stop(self, callback: Callable[[], None]) -> None:
        self.stop_button.on_click(lambda _: callback())
