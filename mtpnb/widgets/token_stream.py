"""TokenStream: the generated text, token by token, coloured by what MTP decoding did with each.

The Python side of token_stream.js / token_stream.css. While a generation runs, tokens travel as
batched custom messages (one every FLUSH_INTERVAL_S at most) that the browser appends on its next
animation frame; when it ends, the whole state lands in synced traits, so a re-opened view or a
saved notebook (with widget state) shows the result, and `_repr_mimebundle_` adds a static HTML and
a plain-text rendering for nbconvert, GitHub and terminals.

A token record, in messages and in the `tokens` trait: [kind, text, position, step, p, q]
(kind: one of mtpnb.TOKEN_KINDS; p, q rounded, None where the engine gives none).
"""

from __future__ import annotations

import html
import pathlib
import threading
import uuid
from collections import deque

import anywidget
import traitlets

from ..events import Result, StepEvent, TokenEvent

_HERE = pathlib.Path(__file__).parent
# The class of mtpnb's widgets that lay out others (Playground, Comparison, ...): token_stream.css keeps
# ipywidgets' "no kernel" icon off them and their inner boxes, and on the controls and views they hold.
LAYOUT_CLASS = "mtp-layout"

# kind -> (legend label, Okabe-Ito colour, second cue). token_stream.css carries the same styles.
KINDS = {
    "accepted": ("accepted draft", "#009E73", "line above"),  # not below: an underlined space reads as "_"
    "rejected": ("rejected draft", "#D55E00", "struck through"),
    "correction": ("correction", "#E69F00", "wavy underline"),
    "bonus": ("bonus", "#56B4E9", "bold"),
    "plain": ("plain", "#0072B2", "no mark"),
}
# The static HTML's styles per kind (and its tag, a cue that survives any HTML sanitizer).
_STATIC = {
    "accepted": ("span", "background:rgba(0,158,115,.22);box-shadow:inset 0 2px 0 #009E73"),
    "rejected": ("del", "color:#D55E00;text-decoration:line-through 2px"),
    "correction": ("u", "background:rgba(230,159,0,.25);text-decoration:underline wavy #E69F00"),
    "bonus": ("b", "background:rgba(86,180,233,.28)"),
    "plain": ("span", "background:rgba(0,114,178,.12)"),
}
# Control characters would vanish or break the layout: show their Unicode "control pictures".
_VISIBLE = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\t\n\r"} | {0x7F: "\u2421"}
# A rejected draft is not part of the output: its whitespace is shown, not laid out.
_VISIBLE_REJECTED = _VISIBLE | {ord("\n"): "\u21b5", ord("\t"): "\u21e5", ord("\r"): "\u240d"}


def token_record(event: TokenEvent) -> list:
    """A TokenEvent as the compact list the front end reads."""
    p = None if event.p is None else round(event.p, 4)
    q = None if event.q is None else round(event.q, 4)
    return [event.kind, event.text, event.position, event.step, p, q]


def describe_token(record: list) -> str:
    """The tooltip / aria-label of a token: its kind, draft position, step, p and q."""
    kind, _, position, step, p, q = record
    parts = [KINDS[kind][0]]
    if position:
        parts.append(f"position {position}")
    parts.append(f"step {step}")
    if p is not None:
        parts.append(f"p={p:.3f}")
    if q is not None:
        parts.append(f"q={q:.3f}")
    return " · ".join(parts)


class TokenStream(anywidget.AnyWidget):
    """Tokens as they are decided: accepted drafts, rejected drafts (struck through, followed by
    their correction), corrections, bonus tokens and plain tokens, each with its colour and cue.

        view = TokenStream()            # display it, then feed it with a Generation (see runner)
        TokenStream.from_result(result) # or show a finished Result (e.g. model.generate's)
    """

    _esm = _HERE / "token_stream.js"
    _css = _HERE / "token_stream.css"

    tokens = traitlets.List().tag(sync=True)  # the final token records (empty while streaming)
    text = traitlets.Unicode().tag(sync=True)  # the output text, rejected drafts excluded
    prompt = traitlets.Unicode().tag(sync=True)  # shown dimmed before the output
    label = traitlets.Unicode().tag(sync=True)  # a heading, e.g. "depth 3"
    status = traitlets.Unicode("idle").tag(sync=True)  # idle, running, done, cancelled, error
    finish_reason = traitlets.Unicode().tag(sync=True)
    summary = traitlets.Unicode().tag(sync=True)  # Metrics.summary()
    metrics = traitlets.Dict().tag(sync=True)  # Metrics.to_dict()
    error = traitlets.Unicode().tag(sync=True)  # first line: the message; then details, if any
    hide_rejected = traitlets.Bool(False).tag(sync=True)  # the view's toggle
    depth = traitlets.Int(-1).tag(sync=True)  # of the run shown (-1: not known); depth 0 has no drafts to hide
    # names this model's token store in the browser, and is its model id: the front end finds the model by it
    _stream_key = traitlets.Unicode().tag(sync=True)

    def __init__(self, **kwargs):
        key = uuid.uuid4().hex
        super().__init__(model_id=key, _stream_key=key, **kwargs)
        self._pending: deque[list] = deque()  # records not yet sent (decode thread appends, ticker drains)
        self._records: list[list] = []
        self._sent = 0  # how many of _records went out in batches
        self._sending = threading.Lock()  # a batch (ticker thread) or a replay (kernel thread) at a time
        self._progress = (0, 0.0)  # (generated tokens, seconds) at the last verify step
        self.on_msg(self._replay)

    # -- the sink protocol (see runner.py) ----------------------------------------------------------
    def start(self, prompt: str = "", depth: int = 0) -> None:
        with self._sending:
            self._pending.clear()
            self._records, self._sent = [], 0
        self._progress = (0, 0.0)
        with self.hold_sync():
            self.tokens, self.text, self.prompt = [], "", prompt
            self.summary, self.metrics, self.error, self.finish_reason = "", {}, "", ""
            self.depth = depth
            self.status = "running"

    def event(self, event: TokenEvent | StepEvent) -> None:
        if isinstance(event, TokenEvent):
            record = token_record(event)
            self._records.append(record)
            self._pending.append(record)
        else:
            self._progress = (event.generated, event.elapsed_s)

    def flush(self) -> None:
        """Send the records queued since the last flush as one message."""
        with self._sending:
            n = len(self._pending)
            if not n:
                return
            batch = [self._pending.popleft() for _ in range(n)]
            self._sent += n
            self._send_records("tokens", batch)

    def _replay(self, _, content: dict, buffers) -> None:
        """A front end that began listening late (see token_stream.js) asks for the batches sent before:
        they come back as one message that replaces what it holds. Once the run is over, the synced
        `tokens` trait has them all."""
        if content.get("type") != "replay" or self.status != "running":
            return
        with self._sending:
            self._send_records("replay", self._records[:self._sent])

    def _send_records(self, kind: str, records: list) -> None:
        generated, elapsed = self._progress
        self.send({"type": kind, "tokens": records, "generated": generated, "elapsed": round(elapsed, 3)})

    def finish(self, result: Result | None, status: str = "done", error: str = "") -> None:
        records = [token_record(e) for e in result.events] if result is not None else self._records
        with self.hold_sync():
            self.tokens = records
            self.text = result.text if result is not None else ""
            self.metrics = result.metrics.to_dict() if result is not None else {}
            if result is not None:
                self.depth = result.metrics.depth
            self.summary = result.metrics.summary() if result is not None and result.steps else ""
            self.finish_reason = result.metrics.finish_reason if result is not None else ""
            self.error = error
            self.status = status

    def reset(self, status: str = "idle", error: str = "") -> None:
        """Empty the view: "idle" (waiting for a generation), or "error" with a message."""
        with self._sending:
            self._pending.clear()
            self._records, self._sent = [], 0
        with self.hold_sync():
            self.tokens, self.text, self.prompt = [], "", ""
            self.summary, self.metrics, self.finish_reason = "", {}, ""
            self.error, self.status = error, status

    def show_error(self, message: str) -> None:
        """Show an error (e.g. a bad control value) in place of the output."""
        self.reset("error", message)

    @classmethod
    def from_result(cls, result: Result, prompt: str = "", **kwargs) -> "TokenStream":
        """A view of a finished generation, e.g. `TokenStream.from_result(model.generate(...))`."""
        view = cls(prompt=prompt, **kwargs)
        view.finish(result, "done")
        return view

    # -- renderings without a widget front end ------------------------------------------------------
    def to_html(self) -> str:
        """Static HTML (inline styles, per-token titles): what nbconvert and GitHub show."""
        spans = []
        for record in self.tokens:
            kind, text = record[0], record[1]
            if kind == "rejected" and self.hide_rejected:
                continue
            tag, style = _STATIC[kind]
            shown = text.translate(_VISIBLE_REJECTED if kind == "rejected" else _VISIBLE)
            spans.append(
                f'<{tag} style="{style}" title="{html.escape(describe_token(record))}">{html.escape(shown)}</{tag}>'
            )
        prompt = html.escape(self.prompt.translate(_VISIBLE))
        prompt = f'<span style="opacity:.55">{prompt}</span>' if prompt else ""
        legend = " ".join(
            f'<{_STATIC[k][0]} style="{_STATIC[k][1]};padding:0 .3em">{label} ({cue})</{_STATIC[k][0]}>'
            for k, (label, _, cue) in KINDS.items()
        )
        foot = []
        if self.label:
            foot.append(f"<strong>{html.escape(self.label)}</strong>")
        if self.summary:
            foot.append(html.escape(self.summary))
        if self.error:
            foot.append(f'<span style="color:#D55E00">error: {html.escape(self.error.splitlines()[0])}</span>')
        return (
            '<div class="mtpnb-token-stream-static" style="font-size:13px">'
            f'<div style="font-size:12px;margin-bottom:4px">{legend}</div>'
            '<pre style="white-space:pre-wrap;word-break:break-word;tab-size:4;line-height:1.6;margin:0;padding:6px;'
            f'border:1px solid rgba(128,128,128,.35);border-radius:4px">{prompt}{"".join(spans)}</pre>'
            f'<div style="font-size:12px;opacity:.8;margin-top:4px">{" · ".join(foot)}</div></div>'
        )

    def to_text(self) -> str:
        """Plain text: the output, then the metrics line (or the error)."""
        lines = [f"[{self.label}]"] if self.label else []
        lines.append(self.prompt + self.text)
        if self.error:
            lines.append(f"-- error: {self.error.splitlines()[0]}")
        elif self.summary:
            lines.append(f"-- {self.summary}")
        else:
            lines.append(f"-- {self.status}")
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs):
        data, metadata = super()._repr_mimebundle_(**kwargs)
        data["text/plain"] = self.to_text()
        data["text/html"] = self.to_html()
        return data, metadata

    def __repr__(self) -> str:
        head = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"<TokenStream {self.status}: {head!r}>"
