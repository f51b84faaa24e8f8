"""Comparison: the same prompt at depth 0 (plain decoding) and at depth D, side by side, with the speedup.

The two generations run one after the other on the same model (at the same time they would share
the cores and slow each other down), in one task of the MLX runtime (mtpnb.runtime).

    comparison = Comparison(model)
    comparison.run("def fibonacci(n):", depth=3, max_tokens=64)
    comparison.wait(); comparison.speedup   # {"decode": 1.8, "end_to_end": 1.6, ...}
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable

import ipywidgets as widgets

from ..errors import MTPNBError
from ..events import Result
from ..params import GenerationParams
from ..runtime import Task, runtime
from .runner import Generation, describe_error
from .token_stream import LAYOUT_CLASS, TokenStream

log = logging.getLogger("mtpnb.widgets")


def speedup(base: Result, mtp: Result) -> dict:
    """How the depth-D run compares with the depth-0 run of the same prompt.

    decode / end_to_end: tok/s ratios (> 1: MTP is faster); acceptance: the depth-D run's acceptance
    rate; same_output: whether both produced the same tokens (expected at temperature 0)."""
    b, m = base.metrics, mtp.metrics

    def ratio(x: float, y: float) -> float | None:
        return x / y if y > 0 else None

    return {
        "depth": m.depth,
        "decode": ratio(m.decode_tok_s, b.decode_tok_s),
        "end_to_end": ratio(m.end_to_end_tok_s, b.end_to_end_tok_s),
        "decode_tok_s": (b.decode_tok_s, m.decode_tok_s),
        "end_to_end_tok_s": (b.end_to_end_tok_s, m.end_to_end_tok_s),
        "acceptance": m.acceptance_rate,
        "tokens_per_verify": m.mean_tokens_per_verify,
        "same_output": base.tokens == mtp.tokens,
    }


def describe_speedup(s: dict, *, sampled: bool = False) -> str:
    """One line: 'depth 3 vs depth 0: decode 1.84× (52.1 vs 28.3 tok/s) | end-to-end 1.71× | ...'.
    sampled: the runs sampled (temperature > 0), so different outputs are expected."""
    def times(r):
        return "n/a" if r is None else f"{r:.2f}×"

    b, m = s["decode_tok_s"]
    if s["same_output"]:
        output = "same output"
    else:
        output = "outputs differ" + (" (sampled: expected)" if sampled else "")
    return (
        f"depth {s['depth']} vs depth 0: decode {times(s['decode'])} ({m:.1f} vs {b:.1f} tok/s)"
        f" | end-to-end {times(s['end_to_end'])} | acceptance {s['acceptance']:.0%},"
        f" {s['tokens_per_verify']:.2f} tokens/verify | {output}"
    )


class Comparison(widgets.VBox):
    """Two TokenStreams side by side (depth 0 | depth D) under a line with the speedup.
    Results: `results` (depth-0 Result, depth-D Result) and `speedup` (see `speedup()`)."""

    def __init__(self, model, **kwargs):
        self.model = model
        pane = widgets.Layout(flex="1 1 0%", min_width="0", margin="0 3px")
        self.base = TokenStream(label="depth 0 (plain decoding)", layout=pane)
        self.mtp = TokenStream(label="depth D", layout=pane)
        self.verdict = widgets.HTML()
        self.results: tuple[Result, Result] | None = None
        self._generations: list[Generation] = []  # the depth-0 run, then the depth-D one
        self._next: tuple = ()  # (prompt, params) of the depth-D run
        self._stopped = False
        self._task: Task | None = None  # both runs, on the runtime's thread
        self._say("Runs the same prompt at depth 0 and at depth D, one after the other.")
        super().__init__([self.verdict, widgets.HBox([self.base, self.mtp])], **kwargs)
        self.add_class(LAYOUT_CLASS)

    @property
    def speedup(self) -> dict | None:
        """`speedup(base, mtp)` of the last finished comparison, None before."""
        return speedup(*self.results) if self.results else None

    def run(self, prompt, *, depth: int = 3, **params) -> "Comparison":
        """Start the depth-0 run, then the depth-`depth` one once it is done; returns at once.
        Parameters as for model.stream; MTPNBError here for bad ones, or a model without an MTP head."""
        if not self.done:
            raise MTPNBError("a comparison is already running: stop it first")
        if not self.model.has_mtp:
            raise MTPNBError(f"{self.model.name} has no MTP head: there is no depth to compare with depth 0")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise MTPNBError(f"a comparison needs a depth >= 1, not {depth!r}")
        base = Generation(self.model, prompt, {**params, "depth": 0}, [self.base])  # checks the parameters
        GenerationParams.of(**params, depth=depth)  # and the depth, without starting anything
        self._next = (prompt, {**params, "depth": depth})
        self._generations, self._stopped, self.results = [base], False, None
        self.mtp.reset()
        self.mtp.label = f"depth {depth} (MTP)"
        self._say(f"Generating at depth 0, then at depth {depth}…")
        base.claim()
        self._task = runtime().submit(self._run_both, base)
        return self

    def stop(self) -> None:
        """Stop the generation in progress and skip the one not yet started."""
        self._stopped = True
        for generation in self._generations:
            generation.stop()

    def wait(self, timeout: float | None = None) -> tuple[Result, Result] | None:
        """Block until both runs have finished; return (depth-0 result, depth-D result), or None if
        either was stopped or failed. A KeyboardInterrupt stops the comparison and still waits."""
        if self._task is not None:
            self._task.settle(timeout, on_interrupt=self.stop)
        return self.results

    @property
    def done(self) -> bool:
        return self._task is None or self._task.done

    def add_done_callback(self, fn: Callable[["Comparison"], None]) -> None:
        """Call fn(comparison) when the comparison ends (at once if none is running)."""
        if self._task is None:
            fn(self)
        else:
            self._task.add_done_callback(lambda _: fn(self))

    def show_error(self, message: str) -> None:
        self._say(message.splitlines()[0], error=True)

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        line = self._verdict() if self.results else "no finished comparison"
        data["text/plain"] = "\n\n".join([line, self.base.to_text(), self.mtp.to_text()])
        panes = "".join(f'<div style="flex:1 1 0;min-width:0">{pane.to_html()}</div>' for pane in (self.base, self.mtp))
        data["text/html"] = (f"<div><p><strong>{html.escape(line)}</strong></p>"
                             f'<div style="display:flex;gap:8px">{panes}</div></div>')
        return data

    # -- the runtime's thread -------------------------------------------------------------------
    def _run_both(self, base: Generation) -> None:
        try:
            self._run_both_or_fail(base)
        except Exception as exc:  # shown, never a silent dead comparison
            log.exception("a comparison failed")
            self.mtp.show_error(describe_error(exc))
            self._say("The comparison failed: see the error below.", error=True)

    def _run_both_or_fail(self, base: Generation) -> None:
        base.run()
        failed = False
        if base.status == "done" and not self._stopped:
            prompt, params = self._next
            try:
                mtp = Generation(self.model, prompt, params, [self.mtp])
                self._generations.append(mtp)
                self._say(f"Generating at depth {params['depth']}…")
                mtp.claim()
            except Exception as exc:
                self.mtp.show_error(describe_error(exc))
                failed = True
            else:
                if self._stopped:  # Stop pressed while this run was being set up
                    mtp.stop()
                mtp.run()
        statuses = [g.status for g in self._generations]
        if statuses == ["done", "done"]:
            self.results = tuple(g.result for g in self._generations)
            self._say(self._verdict(), strong=True)
        elif failed or "error" in statuses:
            self._say("The comparison failed: see the error below.", error=True)
        else:
            self._say("Stopped: no speedup to report.")

    def _verdict(self) -> str:
        return describe_speedup(self.speedup, sampled=self._next[1].get("temperature", 0) > 0)

    def _say(self, text: str, *, strong: bool = False, error: bool = False) -> None:
        style = "padding:4px 2px;font-size:var(--jp-ui-font-size1,13px);color:var(--jp-ui-font-color1,#222)"
        if error:
            style += ";border-left:4px solid #D55E00;padding-left:8px"
        body = f"<strong>{html.escape(text)}</strong>" if strong else html.escape(text)
        self.verdict.value = f'<div class="mtp-verdict" style="{style}">{body}</div>'
