"""Multi-turn prefix reuse: snapshots of a generation's state, kept in a bounded LRU, so that a prompt
that extends a cached prefix (the previous turn's prompt and answer, a shared system prompt) starts
from that state instead of prefilling it again.

A Gated DeltaNet layer's state cannot be trimmed back to an earlier position (mlx-lm's own server
therefore reuses only caches whose key is a prefix of the new prompt, for hybrid models), so states
are kept at the points a conversation comes back to: where the conversation so far ends (a chat
prompt without the generation prompt: the next turn's prompt starts with it even where the template
renders this turn's answer otherwise than it was generated, as Qwen3.5's drops the empty thinking
block), the end of the prompt, and the end of the answer. A snapshot holds, for the tokens the trunk
has consumed (the per-head parts for every MTP layer):
- the trunk's caches (attention keys and values cut to their length; Gated DeltaNet conv and
  recurrent states), as immutable MLX arrays: restoring builds fresh cache objects around them, so a
  generation that goes on from a snapshot (and rolls back, or fails half-way) never changes it;
- for speculative decoding, the MTP head's KV cache and the trunk's hidden states at the last
  positions the head has not consumed yet (`pending`: the head reads the hidden state at t with the
  token at t+1, which for the last position is not known until the next token is).
A snapshot is stored only once its arrays are evaluated, and the end-of-answer one only when the
generation ended on its own (not cancelled, not failed).

The LRU, its byte cap and its prefix search are mlx-lm's `LRUPromptCache` (models.cache), keyed by
(model, kind): a snapshot with a head part ("mtp") serves every depth, one without ("plain") serves
depth 0 only. A lookup searches the prompt minus its last token, so at least one token is prefilled:
its logits give the first output token.

Exactness: greedy output is the same with and without reuse (tests/test_prompt_cache.py, depth 0 and
3); the probabilities agree up to float rounding, since a reused prefix was prefilled in other chunks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, LRUPromptCache

from .errors import MTPNBError
from .head import HeadCache

log = logging.getLogger("mtpnb.prompt_cache")

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_ENTRIES = 64


@dataclass(frozen=True, eq=False)
class Snapshot:
    """The state after `tokens`: immutable (copying one is the identity)."""

    tokens: tuple[int, ...]
    trunk: tuple  # per layer: ("kv", keys, values) cut to the cached length, or ("arrays", (arrays...))
    head: tuple | None  # per MTP layer, the head's (keys, values); None: a snapshot of plain decoding
    pending: mx.array | None  # [1, P, H] trunk hidden states at the last P positions, not yet in the head

    def arrays(self) -> list[mx.array]:
        out = [a for layer in self.trunk for a in (layer[1:] if layer[0] == "kv" else layer[1]) if a is not None]
        out += [a for layer in (self.head or ()) for a in layer if a is not None]
        return out + ([self.pending] if self.pending is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def is_trimmable(self) -> bool:  # for LRUPromptCache: a Gated DeltaNet state, a head: never trimmed
        return False

    def __deepcopy__(self, memo):  # LRUPromptCache hands out deep copies; the arrays are immutable
        return self


def _kv(cache: KVCache) -> tuple:
    if cache.keys is None or cache.offset == 0:
        return (None, None)
    return tuple(mx.contiguous(a[..., : cache.offset, :]) for a in (cache.keys, cache.values))


def _set_kv(cache: KVCache, keys, values) -> None:
    # Exactly as long as the state: the cache's next update allocates a new buffer, never writes into these.
    cache.keys, cache.values, cache.offset = keys, values, (0 if keys is None else keys.shape[2])


def trunk_state(cache: list) -> tuple | None:
    """The state a trunk's caches hold now (lazy arrays; later updates of the caches do not change
    it); None for cache types this module does not know how to copy."""
    layers = []
    for c in cache:
        if isinstance(c, KVCache):
            layers.append(("kv", *_kv(c)))
        elif isinstance(c, ArraysCache):  # Gated DeltaNet (mlx-lm's, or mtpnb.rollback's)
            layers.append(("arrays", tuple(c.cache)))
        else:
            return None
    return tuple(layers)


class PromptCache:
    """States of earlier generations, reused by later ones whose prompt extends them.

    Pass one to `model.generate(..., cache=prompt_cache)` / `model.stream(...)`, or to `mtpnb serve`
    (`--prompt-cache-mb`), which shares one across requests. Bounded by `max_bytes` (the arrays the
    snapshots hold) and `max_entries`; the least recently used go first. Greedy output is the same with
    and without it. Thread-safe; `stats` says how much it saved."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES):
        if not (isinstance(max_bytes, int) and max_bytes > 0):
            raise MTPNBError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        if not (isinstance(max_entries, int) and max_entries > 0):
            raise MTPNBError(f"max_entries must be a positive integer, got {max_entries!r}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self._models: dict[int, object] = {}  # id -> model: kept alive so that an id is never reused
        self._lock = threading.Lock()
        self.lookups = self.hits = self.tokens_queried = self.tokens_reused = self.stored = 0

    def lookup(self, model, ids: list[int], *, speculative: bool) -> "Reuse":
        """The longest cached state whose tokens are a prefix of ids[:-1], for a generation at depth
        > 0 (`speculative`: a state with the head's part) or at depth 0 (any)."""
        kinds = ("mtp",) if speculative else ("mtp", "plain")
        with self._lock:
            self._models.setdefault(id(model), model)
            best = None
            for kind in kinds:
                found, _ = self._lru.fetch_nearest_cache((id(model), kind), ids[:-1])
                if found and (best is None or len(found[0].tokens) > len(best[1].tokens)):
                    best = (kind, found[0])
            self.lookups += 1
            self.tokens_queried += len(ids)
            if best is not None:
                kind, found = best
                self.hits += 1
                self.tokens_reused += len(found.tokens)
                # LRUPromptCache's fetch does not refresh an entry: inserting it again does
                self._lru.insert_cache((id(model), kind), list(found.tokens), [found], cache_type="user")
        return Reuse(self, model, None if best is None else best[1])

    def store(self, model, state: Snapshot, *, answer: bool) -> bool:
        """Evaluate and keep a state; False (nothing kept) if evaluating it failed."""
        try:
            mx.eval(state.arrays())
        except Exception:  # noqa: BLE001  a failed state is never kept
            log.exception("a prompt-cache snapshot failed to evaluate; not kept")
            return False
        if state.nbytes > self.max_bytes:
            return False
        kind = "plain" if state.head is None else "mtp"
        with self._lock:
            self._lru.insert_cache((id(model), kind), list(state.tokens), [state],
                                   cache_type="assistant" if answer else "user")
            self.stored += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._lru.trim_to(n_sequences=0)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._lru), "bytes": self._lru.nbytes, "max_bytes": self.max_bytes,
                    "max_entries": self.max_entries, "lookups": self.lookups, "hits": self.hits,
                    "tokens_queried": self.tokens_queried, "tokens_reused": self.tokens_reused,
                    "stored": self.stored}

    def __repr__(self) -> str:
        s = self.stats
        return (f"<mtpnb.PromptCache {s['entries']} states, {s['bytes'] / 2**20:.1f} of "
                f"{self.max_bytes / 2**20:.0f} MB; {s['hits']}/{s['lookups']} hits, "
                f"{s['tokens_reused']} tokens reused>")


class Reuse:
    """One generation's use of a PromptCache: the state it starts from (if any), and where it keeps its own."""

    def __init__(self, prompt_cache: PromptCache, model, start: Snapshot | None):
        self.prompt_cache, self.model, self.start = prompt_cache, model, start

    @property
    def tokens(self) -> int:
        """Prompt tokens whose state comes from the cache (0: none)."""
        return len(self.start.tokens) if self.start is not None else 0

    def restore(self, cache: list, head_cache: HeadCache | None) -> mx.array | None:
        """Load the starting state into fresh caches (the trunk's and, at depth > 0, the head's);
        returns the pending hidden states the head has not consumed (None at depth 0 or no start)."""
        if self.start is None:
            return None
        for c, layer in zip(cache, self.start.trunk, strict=True):
            if layer[0] == "kv":
                _set_kv(c, *layer[1:])
            else:
                c.cache = list(layer[1])
        if head_cache is None:
            return None
        for c, layer in zip(head_cache.caches, self.start.head, strict=True):
            _set_kv(c, *layer)
        return self.start.pending

    def keep(self, tokens, trunk: list | tuple | None, head_cache: HeadCache | None = None,
             pending: mx.array | None = None, *, answer: bool) -> None:
        """Store the state after `tokens`: the trunk's (its caches, or a `trunk_state` taken earlier),
        and at depth > 0 the head's cache and the hidden states it has not consumed. Lazy arrays are
        evaluated first."""
        if isinstance(trunk, list):
            trunk = trunk_state(trunk)
        if trunk is not None:
            head = None if head_cache is None else tuple(_kv(c) for c in head_cache.caches)
            self.prompt_cache.store(self.model, Snapshot(tuple(tokens), trunk, head, pending), answer=answer)
