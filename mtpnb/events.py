"""What a generation tells the outside world: token events, verify-step events, metrics, result.

Plain dataclasses, no MLX and no Jupyter: the widget layer, the magics, the CLI and the server all
consume these, and a remote client rebuilds them from JSON (`from_dict`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Iterable
from typing import Any

from .errors import MTPNBError

# The kind of every token a generation shows.
#   accepted   a draft token the target kept (part of the output)
#   rejected   a draft token the target discarded (shown, NOT part of the output)
#   correction the token sampled from the residual in place of the first rejected draft
#   bonus      the extra token sampled from the target after all drafts were accepted
#   plain      a token of plain autoregressive decoding (depth 0, or a model without MTP head)
TOKEN_KINDS = ("accepted", "rejected", "correction", "bonus", "plain")


@dataclass(slots=True)
class TokenEvent:
    token: int
    text: str  # what this token adds to the output text (rejected: its own decoded text); the
    # pieces of the output tokens add up to Result.text, the tokenizer's decoding of the output tokens
    # after the prompt's (a character completed by a later token lands on that token's piece; one
    # that an EOS leaves incomplete, on the last one)
    kind: str  # one of TOKEN_KINDS
    step: int  # index of the verify step (decode step at depth 0) that decided it, from 0
    position: int  # 1..D: draft position it was drafted at, or the position it fills; 0 for plain
    p: float | None = None  # probability under the target's processed distribution
    q: float | None = None  # probability under the draft's distribution (drafted tokens only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenEvent":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(slots=True)
class StepEvent:
    step: int
    drafted: int  # drafts proposed at this step (0 at depth 0)
    accepted: int  # drafts kept in the output (the end of the generation may cut a step short)
    emitted: int  # tokens added to the output (accepted + correction/bonus)
    draft_s: float  # wall time of building the draft phase (and computing it, when profiling)
    verify_s: float  # wall time of verify + acceptance until the decision is on the host (the drafts'
    # compute included, unless profiling: then the drafts are evaluated apart, in draft_s)
    elapsed_s: float  # since the generation started
    generated: int  # output tokens so far
    phases: dict[str, float] | None = None  # when profiling (Engine(profile=True)): verify_forward_s,
    # accept_sync_s, rollback_s of this step, each phase ended by an eval barrier

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["phases"] is None:  # the wire format carries it only when there is one
            del d["phases"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepEvent":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(slots=True)
class Metrics:
    depth: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of the prompt's tokens, those whose state came from a prompt cache
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tok_s: float = 0.0  # prompt tokens prefilled (those not from a prompt cache) / ttft_s
    decode_tok_s: float = 0.0  # tokens after the first / time after the first
    end_to_end_tok_s: float = 0.0  # all generated tokens / whole wall time, prefill included
    decode_tok_s_first32: float = 0.0  # decode tok/s over the first 32 generated tokens
    total_s: float = 0.0
    verify_calls: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    rejected_drafts: int = 0
    correction_tokens: int = 0
    bonus_tokens: int = 0
    acceptance_rate: float = 0.0  # accepted_drafts / drafted_tokens
    acceptance_by_position: list[float] = field(default_factory=list)  # P(accept | reached), per draft position
    mean_tokens_per_verify: float = 0.0
    draft_s: float = 0.0  # summed draft-phase time
    verify_s: float = 0.0  # summed verify-phase time
    active_memory_mb: float = 0.0
    peak_memory_mb: float = 0.0
    finish_reason: str = ""  # "length", "stop" (EOS or stop string), "cancelled"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def summary(self) -> str:
        """One line a person reads: the figures that say whether MTP paid off."""
        line = (
            f"{self.generated_tokens} tokens | TTFT {self.ttft_s * 1e3:.0f} ms | "
            f"decode {self.decode_tok_s:.1f} tok/s | end-to-end {self.end_to_end_tok_s:.1f} tok/s"
        )
        if self.depth > 0 and self.verify_calls:
            line += (
                f" | depth {self.depth}: acceptance {self.acceptance_rate:.0%}, "
                f"{self.mean_tokens_per_verify:.2f} tokens/verify"
            )
        return line + f" | peak {self.peak_memory_mb:.0f} MB"


@dataclass
class Result:
    tokens: list[int]  # generated ids (the output; rejected drafts excluded)
    text: str
    events: list[TokenEvent]  # every token shown, rejected drafts included, in order
    steps: list[StepEvent]
    metrics: Metrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "text": self.text,
            "events": [e.to_dict() for e in self.events],
            "steps": [s.to_dict() for s in self.steps],
            "metrics": self.metrics.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        return cls(
            tokens=list(d["tokens"]),
            text=d["text"],
            events=[TokenEvent.from_dict(e) for e in d.get("events", [])],
            steps=[StepEvent.from_dict(s) for s in d.get("steps", [])],
            metrics=Metrics.from_dict(d["metrics"]),
        )

    def __repr__(self) -> str:
        head = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"Result({head!r}, {self.metrics.summary()})"


@dataclass(slots=True)
class Done:
    """Last event of a stream: the whole result."""

    result: Result


def final_result(events: Iterable) -> Result:
    """The Result that ends a stream of events (its Done); the rest of the events are consumed."""
    for event in events:
        if isinstance(event, Done):
            return event.result
    raise MTPNBError("the stream ended without a result")
