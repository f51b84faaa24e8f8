"""LiveCharts: what a running generation is doing, in three plotly charts that update a few times a second.

- decode tok/s over time: over the last second of verify steps (solid) and since the first token (dashed);
- acceptance per draft position: P(draft j accepted | draft j was tested);
- tokens per verify step: how many verify steps emitted 1, 2, ... D+1 tokens.

The figure is a plain `go.Figure` shown through plotly's own mime renderer (jupyterlab-plotly, also in
Notebook 7 and VS Code) inside an `ipywidgets.Output`; each redraw, at most every `refresh_s`, replaces
that output with the figure's JSON (a bounded window of points, so a few kB). Not a `FigureWidget`: that
is an anywidget whose front end is all of plotly.js (~5 MB) sent and parsed per figure, and anywidget
gives a model 2 s to initialise; on a busy CPU it missed that, logged "[anywidget] Failed to initialize
model." and then dropped every later update, leaving a blank chart. `to_mimebundle()` is the same figure
as a static output, for a saved notebook.
"""

from __future__ import annotations

import bisect
import json
import time
from collections import deque

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..events import Result, StepEvent, TokenEvent
from ..metrics import count_positions
from .token_stream import LAYOUT_CLASS

RATE_WINDOW_S = 1.0  # the solid line's tok/s is measured over the verify steps of the last second
MAX_POINTS = 240  # points kept on the time axis (a minute at 4 redraws a second)
GREY = "#808080"  # reads on light and dark notebook themes alike (plotly cannot use CSS variables)
TITLES = ("decode tok/s", "acceptance per draft position", "tokens per verify step")


def rate_point(steps: list[tuple[float, int]], ttft: float, end: int | None = None) -> tuple[float, float, float]:
    """(time, tok/s over the last RATE_WINDOW_S, tok/s since the first token) at steps[end - 1];
    `steps`: (elapsed s, tokens generated) per verify step, oldest first, at least two."""
    end = len(steps) if end is None else end
    t, generated = steps[end - 1]
    t0, g0 = steps[min(bisect.bisect_left(steps, (t - RATE_WINDOW_S,), 0, end - 1), end - 2)]
    rate = (generated - g0) / (t - t0) if t > t0 else 0.0
    average = (generated - 1) / (t - ttft) if t > ttft else 0.0
    return round(t, 3), round(rate, 2), round(average, 2)


def _title(name: str, detail: str = "") -> str:
    return f"{name}<br><sup>{detail or '&nbsp;'}</sup>"


class LiveCharts(widgets.VBox):
    """Live charts of one generation; a sink for runner.Generation (see runner.py).

        charts = LiveCharts()
        Generation(model, prompt, params, [token_stream, charts]).start()
    """

    def __init__(self, *, refresh_s: float = 0.25, height: int = 250, **kwargs):
        self.refresh_s = refresh_s
        titles = [_title(name) for name in TITLES]
        self.figure = go.Figure(make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.09))
        self.figure.add_scatter(row=1, col=1, mode="lines", line={"color": "#0072B2", "width": 2}, name="last second")
        self.figure.add_scatter(row=1, col=1, mode="lines", line={"color": "#0072B2", "dash": "dash", "width": 1},
                                name="average")
        self.figure.add_bar(row=1, col=2, marker_color="#009E73", name="acceptance", texttemplate="%{y:.0%}",
                            textposition="outside", cliponaxis=False)
        self.figure.add_bar(row=1, col=3, marker_color="#E69F00", name="verify steps", texttemplate="%{y}",
                            textposition="outside", cliponaxis=False)
        self.figure.update_layout(
            height=height, autosize=True, margin={"l": 40, "r": 10, "t": 60, "b": 40}, showlegend=False,
            paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", font={"color": GREY, "size": 11},
        )
        self.figure.update_xaxes(gridcolor="rgba(128,128,128,.2)", zeroline=False)
        self.figure.update_yaxes(gridcolor="rgba(128,128,128,.2)", zeroline=False, rangemode="tozero")
        self.figure.update_xaxes(title_text="seconds", row=1, col=1)
        self.figure.update_xaxes(title_text="draft position", dtick=1, row=1, col=2)
        self.figure.update_yaxes(range=[0, 1.15], tickformat=".0%", row=1, col=2)
        self.figure.update_xaxes(title_text="tokens emitted", dtick=1, row=1, col=3)
        self.output = widgets.Output(layout={"width": "100%"})
        super().__init__([self.output], **kwargs)
        self.add_class(LAYOUT_CLASS)
        self.start(depth=None)

    # -- the sink protocol (see runner.py) ----------------------------------------------------------
    def start(self, prompt: str = "", depth: int | None = 0) -> None:
        """A new run at `depth` (None: empty charts before any run, which say nothing about a depth)."""
        self._before_any_run = depth is None
        self.depth = depth = depth or 0
        self._steps: deque[tuple[float, int]] = deque(maxlen=256)  # (elapsed s, generated) per step
        self._ttft = 0.0
        self._reached = [0] * depth  # verify steps that tested draft position j
        self._accepted = [0] * depth
        self._emitted = [0] * (depth + 1)  # verify steps that emitted j + 1 tokens
        self._drafted_total = self._accepted_total = 0
        self._times: deque[float] = deque(maxlen=MAX_POINTS)
        self._rate: deque[float] = deque(maxlen=MAX_POINTS)
        self._average: deque[float] = deque(maxlen=MAX_POINTS)
        self._last_draw = 0.0
        self._drawn_step = None
        self._acceptance: list[float] | None = None  # the engine's exact figures, once finished
        self._draw()

    def event(self, event: TokenEvent | StepEvent) -> None:
        if not isinstance(event, StepEvent):
            return
        if event.step == 0:
            self._ttft = event.elapsed_s
        else:
            count_positions(event, self._reached, self._accepted)
            self._emitted[min(event.emitted, len(self._emitted)) - 1] += 1
            self._drafted_total += event.drafted
            self._accepted_total += event.accepted
        self._steps.append((event.elapsed_s, event.generated))

    def flush(self) -> None:
        now = time.perf_counter()
        if now - self._last_draw >= self.refresh_s:
            self._sample()
            self._draw()
            self._last_draw = now

    def finish(self, result: Result | None, status: str = "done", error: str = "") -> None:
        if result is not None and len(result.steps) > 1:  # redraw the whole run, not just what was sampled
            steps = [(s.elapsed_s, s.generated) for s in result.steps]
            stride = max(1, (len(steps) - 1) // MAX_POINTS + 1)
            ends = list(range(len(steps), 1, -stride))[::-1]  # the last step always among them
            times, rates, averages = zip(*(rate_point(steps, self._ttft, end) for end in ends))
            self._times = deque(times, maxlen=MAX_POINTS)
            self._rate = deque(rates, maxlen=MAX_POINTS)
            self._average = deque(averages, maxlen=MAX_POINTS)
            if result.metrics.finish_reason != "cancelled":
                self._acceptance = list(result.metrics.acceptance_by_position)
        else:
            self._sample()
        self._draw()

    # -- drawing ------------------------------------------------------------------------------------
    def _sample(self) -> None:
        """Add a point to the tok/s series if a verify step ended since the last one."""
        steps = list(self._steps)  # one C-level copy: the decode thread appends meanwhile
        if len(steps) < 2 or steps[-1] == self._drawn_step:
            return
        self._drawn_step = steps[-1]
        t, rate, average = rate_point(steps, self._ttft)
        self._times.append(t)
        self._rate.append(rate)
        self._average.append(average)

    def _draw(self) -> None:
        positions = list(range(1, self.depth + 1))
        acceptance = self._acceptance or [a / r if r else 0.0 for a, r in zip(self._accepted, self._reached)]
        drafted = self._drafted_total
        mean_acceptance = self._accepted_total / drafted if drafted else None  # Metrics.acceptance_rate
        verify_steps = sum(self._emitted)
        mean_emitted = sum((j + 1) * n for j, n in enumerate(self._emitted)) / verify_steps if verify_steps else None
        rate, accept, per_verify = self.figure.layout.annotations
        fig = self.figure
        with fig.batch_update():
            fig.data[0].x, fig.data[0].y = list(self._times), list(self._rate)
            fig.data[1].x, fig.data[1].y = list(self._times), list(self._average)
            fig.data[2].x, fig.data[2].y = positions, acceptance
            fig.data[3].x, fig.data[3].y = list(range(1, self.depth + 2)), list(self._emitted)
            fig.layout.xaxis2.range = [0.5, max(self.depth, 1) + 0.5]
            fig.layout.xaxis3.range = [0.5, self.depth + 1.5]
            rate.text = _title(TITLES[0], f"{self._rate[-1]:.1f} last second · {self._average[-1]:.1f} average"
                               if self._rate else "")
            if self.depth == 0 and not self._before_any_run:
                accept.text = _title(TITLES[1], "no drafts at depth 0")
            else:
                overall = f"overall {mean_acceptance:.0%}" if mean_acceptance is not None else ""
                accept.text = _title(TITLES[1], overall)
            per_verify.text = _title(TITLES[2], f"mean {mean_emitted:.2f}" if mean_emitted is not None else "")
        self.output.outputs = ({"output_type": "display_data", "data": self.to_mimebundle(), "metadata": {}},)

    def to_mimebundle(self) -> dict:
        """The figure as plotly's mime bundle: what the live view shows, and what a saved notebook keeps."""
        figure = json.loads(self.figure.to_json())
        # Not plotly's `responsive`: its plot is 100% of its div's CSS height once resized (no width in the
        # layout), and a notebook output's div has none: a reopened notebook drew the chart 0 px high. Without
        # it the layout's height holds, and the front end's resize (Plots.resize) sets the container's width.
        figure["config"] = {"displaylogo": False}
        return {"application/vnd.plotly.v1+json": figure, "text/plain": "LiveCharts: " + ", ".join(TITLES)}

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        return {**data, **{k: v for k, v in self.to_mimebundle().items() if k != "text/plain"}}
