"""Tool calls and thinking in a model's output, for both APIs of `mtpnb serve`. No sockets, no MLX.

The tools reach the model through its own chat template (the engine passes them to
`apply_chat_template(..., tools=...)`); what the model writes back is cut into segments here, as it
streams: text, thinking (between the template's think markers) and tool calls (between the markers of
the tool parser mlx-lm inferred from the template, parsed by that parser: `mlx_lm.tool_parsers`).
Text that may be the beginning of a marker is held back until the next piece decides it, so no
marker ever reaches a client, and the segments of a stream always equal those of the whole text.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("mtpnb.server")

THINK_START, THINK_END = "<think>", "</think>"  # when the tokenizer names none (its markers are not tokens)


@dataclass
class Segment:
    kind: str  # "text" | "thinking" | "tool_call"
    text: str = ""  # text / thinking: the piece
    name: str = ""  # tool_call: the function's name
    arguments: dict = field(default_factory=dict)  # tool_call: its arguments (JSON object)


def call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


class OutputSplitter:
    """Cuts a model's output into Segments, piece by piece.

    tools: the request's tools (the parser converts argument values by their schema), or None: then
        tool-call markers are ordinary text.
    thinking: separate the thinking (Anthropic's thinking blocks); `opened`: the prompt itself opened
        the think block (templates that pre-fill the think marker), so the output starts inside it.
    in_call: the prompt opened a tool call (a forced call, see call_opening): the output starts inside it.
    """

    def __init__(self, tokenizer, tools: list | None = None, *, thinking: bool = False, opened: bool = False,
                 in_call: bool = False):
        self.tools = tools
        self.tool_start = getattr(tokenizer, "tool_call_start", None) if tools else None
        self.tool_end = getattr(tokenizer, "tool_call_end", None)
        self.parse = getattr(tokenizer, "tool_parser", None)
        self.think_start = getattr(tokenizer, "think_start", None) or THINK_START
        self.think_end = getattr(tokenizer, "think_end", None) or THINK_END
        self.state = ("thinking" if opened else "start") if thinking else "text"
        if in_call and self.tool_start:
            self.state = "tool"
        self.pending = ""  # text not yet given out: a possible marker start, or a tool call's body
        self.thought = False  # some thinking was given out (blank lines before it are dropped)
        self.after_thinking = False  # drop the blank lines between the think block and the answer
        self.calls = 0

    def feed(self, text: str) -> list[Segment]:
        self.pending += text
        return self._run(final=False)

    def finish(self) -> list[Segment]:
        """The end of the output: give out what was held back."""
        out = self._run(final=True)
        if self.state == "tool" and self.pending:  # the output ended inside a call (max_tokens, or EOS
            out.extend(self._call(self.pending))  # right after the call): parse what there is
        self.pending = ""
        return out

    def _run(self, final: bool) -> list[Segment]:
        out: list[Segment] = []
        while self._advance(out, final):
            pass
        return [s for s in out if s.kind == "tool_call" or s.text]

    def _advance(self, out: list, final: bool) -> bool:
        """One transition of the state machine; True when another may follow."""
        p = self.pending
        if self.state == "start":  # does the model open a think block itself?
            stripped = p.lstrip()
            if stripped.startswith(self.think_start):
                self.state, self.pending = "thinking", stripped[len(self.think_start):]
                return True
            if not final and self.think_start.startswith(stripped):
                return False  # undecided: wait for more
            self.state = "text"
            return True
        if self.state == "thinking":
            i = p.find(self.think_end)
            end = i if i >= 0 else len(p) - (0 if final else _partial(p, self.think_end))
            piece = p[:end] if self.thought else p[:end].lstrip("\n")
            self.thought = self.thought or bool(piece)
            out.append(Segment("thinking", piece))
            if i < 0:
                self.pending = p[end:]
                return False
            self.state, self.pending, self.after_thinking = "text", p[i + len(self.think_end):], True
            return True
        if self.state == "text":
            if self.after_thinking:
                p = self.pending = p.lstrip()
                if not p and not final:
                    return False
                self.after_thinking = False
            i = p.find(self.tool_start) if self.tool_start else -1
            if i >= 0:  # the text before a call, without the blank lines that lead to it
                out.append(Segment("text", p[:i].rstrip()))
                self.state, self.pending = "tool", p[i + len(self.tool_start):]
                return True
            keep = _partial(p, self.tool_start) if self.tool_start and not final else 0
            body = p[: len(p) - keep]
            if self.tools and (not final or self.calls):  # whitespace that may lead to a call, or
                keep += len(body) - len(body.rstrip())  # follows one, is not part of the answer
                body = body.rstrip()
            out.append(Segment("text", body))
            self.pending = p[len(p) - keep:] if not final else ""
            return False
        # self.state == "tool"
        i = p.find(self.tool_end)
        if i < 0:
            return False
        out.extend(self._call(p[:i]))
        self.state, self.pending = "text", p[i + len(self.tool_end):]
        return True

    def _call(self, body: str) -> list[Segment]:
        """Parse one call's text with the model's tool parser; text that does not parse stays text."""
        try:
            parsed = self.parse(body, self.tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            segments = [Segment("tool_call", name=c["name"], arguments=_arguments(c.get("arguments"))) for c in calls]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("a tool call that does not parse (%s: %s) is returned as text", type(e).__name__, e)
            return [Segment("text", self.tool_start + body + (self.tool_end or ""))]
        self.calls += len(segments)
        return segments


def _arguments(value) -> dict:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"tool-call arguments must be an object, not {type(value).__name__}")
    return value


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def call_opening(tokenizer) -> str | None:
    """The text that opens a tool call in the model's own format (the marker mlx-lm's parser for its
    template looks for). A forced call starts the assistant's turn with it: the model writes the rest,
    which is parsed as usual. None when the model has no tool-call format."""
    return getattr(tokenizer, "tool_call_start", None) or None


def prompt_opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """True when the rendered prompt ends inside a think block the template opened for the model."""
    start = getattr(tokenizer, "think_start", None) or THINK_START
    tail = tokenizer.decode(list(prompt_ids[-16:]))
    return tail.rstrip().endswith(start)
