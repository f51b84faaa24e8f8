"""A loaded model: an mlx-lm trunk, an optional MTP head, a tokenizer, and the forwards the engine uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import cpu_kernels
from .head import HeadCache, MiMoHead, MTPHead, NextNHead
from .params import DRAFT_CONTEXT
from .rollback import RollbackArraysCache


@dataclass
class Model:
    """Threading rule: one generation at a time per model. Generate from the main thread, or from any
    thread: a generation started off the main thread runs on the process's one MLX thread
    (mtpnb.runtime), so generations from threads queue one behind another and the process exits
    cleanly. The widgets and the server run theirs there too, and the widgets refuse to start a
    generation on a model that is already generating for them."""

    trunk: nn.Module  # the mlx-lm model (its `mtp.*` weights stripped)
    head: MTPHead | NextNHead | MiMoHead | None
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    path: Path
    name: str
    notes: list[str] = field(default_factory=list)  # what the loader did that a user should know

    draft_vocab: mx.array | None = None  # token ids the head drafts from (see set_draft_vocab)
    draft_context: int = DRAFT_CONTEXT  # how many context tokens outside it a generation may add (DraftVocabulary)

    def __post_init__(self):
        language_model = getattr(self.trunk, "language_model", self.trunk)
        self._inner = language_model.model  # returns the post-norm hidden state
        self._tied = getattr(language_model.args, "tie_word_embeddings", False)
        self._language_model = language_model
        self._engine = None
        self._draft_weight = None
        self._draft_steps = None  # the head's draft-steps kernel once built (False: it does not apply)
        self.set_draft_vocab(self.draft_vocab, context=self.draft_context)

    # -- the forwards -------------------------------------------------------------------------
    @property
    def has_mtp(self) -> bool:
        return self.head is not None

    def embed(self, ids: mx.array) -> mx.array:
        return self._inner.embed_tokens(ids)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self._tied:
            return self._inner.embed_tokens.as_linear(hidden)
        return self._language_model.lm_head(hidden)

    def set_draft_vocab(self, ids, *, context: int = DRAFT_CONTEXT) -> None:
        """Let the head draft from these token ids only (None: the whole vocabulary), and from up to
        `context` more: a generation's own context tokens outside them (mtpnb.model.DraftVocabulary).

        The head's output projection over the full vocabulary is most of a draft step's cost on
        a CPU (it reads the whole embedding matrix for one row); a frequency-ranked shortlist cuts
        it. Sampling stays exact: drafts are drawn from q restricted to the shortlist, and the
        acceptance uses that same q (zero elsewhere). A token outside it can still be output, as
        a correction or bonus token. Quantized output layers keep the full vocabulary."""
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        head_weight = self._output_layer()
        self.draft_context, self._draft_steps = context, None
        if ids is None or not isinstance(head_weight.weight, mx.array) or hasattr(head_weight, "scales"):
            self.draft_vocab, self._draft_weight = None, None
            return
        self.draft_vocab = mx.array(ids, dtype=mx.int32)
        self._draft_weight = mx.contiguous(head_weight.weight[self.draft_vocab])
        mx.eval(self._draft_weight)

    def draft_vocabulary(self, context_ids: list[int]) -> "DraftVocabulary | None":
        """A generation's draft vocabulary: the shortlist and the tokens of its prompt `context_ids`
        outside it (None without a shortlist: the head drafts from every token)."""
        if self.draft_vocab is None:
            return None
        vocabulary = DraftVocabulary(self.draft_vocab, self._output_layer().weight, self.draft_context)
        vocabulary.add(reversed(context_ids))  # the most recent first, should they not all fit
        return vocabulary

    def draft_ids(self, vocabulary: "DraftVocabulary | None" = None) -> mx.array | None:
        """Each draft column's token id: a generation's `vocabulary`'s, else the shortlist's (None: column
        i is token i, the whole vocabulary)."""
        return self.draft_vocab if vocabulary is None else vocabulary.ids

    def _output_layer(self) -> nn.Module:
        return self._inner.embed_tokens if self._tied else self._language_model.lm_head

    def draft_logits(self, g: mx.array, step: int = 0, vocabulary: "DraftVocabulary | None" = None) -> mx.array:
        """The head's logits over the draft vocabulary (the whole one when none is set; with
        `vocabulary`, a generation's: its context rows after the shortlist's, over its width) from the
        output g of draft step `step` (with several MTP layers, that step's layer reads it)."""
        g = self.head.pre_logits(g, step)
        if self._draft_weight is None:
            return self.lm_head(g)
        logits = cpu_kernels.linear(g, self._draft_weight)
        if vocabulary is None:
            return logits
        rows = vocabulary.context_rows()
        return vocabulary.pad(logits if rows is None else mx.concatenate([logits, cpu_kernels.linear(g, rows)], -1))

    def draft_round(self, hidden: mx.array, tokens: list[int], head_cache: HeadCache, steps: int,
                    vocabulary: "DraftVocabulary | None" = None) -> cpu_kernels.DraftRound | None:
        """One round of `steps` draft steps in C (mtpnb.cpu_kernels.HeadDraftSteps) from the positions the
        head has not read yet (hidden [1, n, H], the token after each), over `vocabulary` (a generation's;
        None: the model's): step 0's rows enter head_cache as the MLX head's would, the later steps' never
        do. None where the kernel does not apply (then the head runs step by step through MLX)."""
        kernel, cache = self._head_draft_steps(), head_cache.caches[0]
        if kernel is None or (cache.keys is not None and cache.keys.dtype != mx.float32):
            return None
        return kernel.round(cache, hidden, tokens, steps, vocabulary)

    def _head_draft_steps(self) -> cpu_kernels.HeadDraftSteps | None:
        """The head's draft-steps kernel, built once; None where it does not apply."""
        if not isinstance(self.head, MTPHead) or type(self.head.fc) is not cpu_kernels.SmallBatchLinear:
            return None  # not a Qwen head, or the CPU kernels are not installed on it (any more)
        if self._draft_steps is None:
            rows = self._output_layer().weight if self._draft_weight is None else self._draft_weight
            self._draft_steps = self.head.draft_steps_kernel(self._inner.embed_tokens.weight, rows,
                                                             self.draft_vocab) or False
        return self._draft_steps or None

    def forward(self, ids: mx.array, cache=None, *, last_only: bool = False) -> tuple[mx.array, mx.array]:
        """ids [B, L] -> (post-norm hidden [B, L, H], logits [B, L, V]; [B, 1, V] with last_only, as a
        prefill needs: a long prompt's logits at every position are its largest array)."""
        hidden = self._inner(ids, cache=cache)
        return hidden, self.lm_head(hidden[:, -1:] if last_only else hidden)

    def mtp_forward(self, hidden: mx.array, next_ids: mx.array, cache=None, step: int = 0) -> tuple[mx.array, mx.array]:
        """One head step: hidden [B, T, H] at positions t, next_ids [B, T] = tokens at t+1
        -> (g [B, T, H], logits [B, T, V]) predicting the tokens at t+2. g is what the next step
        takes (the head's `pre_logits` brings it to what lm_head reads). `step`: the draft step
        (0 for the committed positions), which picks the MTP layer when there are several
        (mtpnb.head.HeadCache says what enters which layer's cache)."""
        if self.head is None:
            raise RuntimeError(f"{self.name} has no MTP head")
        g = self.head(hidden, self.embed(next_ids), cache=cache, step=step)
        return g, self.lm_head(self.head.pre_logits(g, step))

    def make_cache(self, rollback: bool = True) -> list:
        """Trunk caches: KV caches for attention and, for Gated DeltaNet, taped caches that can roll
        back (rollback=False: mlx-lm's own, for plain decoding, which never rolls back)."""
        cache = make_prompt_cache(self.trunk)
        if not rollback:
            return cache
        return [RollbackArraysCache() if not isinstance(c, KVCache) else c for c in cache]

    def make_head_cache(self) -> HeadCache | None:
        return HeadCache(len(self.head.layers)) if self.head is not None else None

    def use_verify_kernels(self, enabled: bool = True) -> int:
        """Route the quantized linears (trunk and head) through mtpnb's verify kernels, which
        read each weight once for up to 8 rows (CUDA; Metal untested; the CPU keeps MLX's op).
        Returns how many layers were switched; a no-op on an unquantized model. An MoE model's routed
        experts stay on MLX's gather_qmm (mtpnb.kernels says why); `info()["verify_kernels"]` says
        what is covered."""
        from .kernels import disable_verify_kernels, enable_verify_kernels

        switch = enable_verify_kernels if enabled else disable_verify_kernels
        return sum(switch(m) for m in (self.trunk, self.head) if m is not None)

    # -- decoding (the engine does the work) ----------------------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            from .engine import Engine

            self._engine = Engine(self)
        return self._engine

    def generate(self, prompt, **params):
        """Decode a prompt (text, token ids, or chat messages) and return a Result.
        Parameters: see `mtpnb.params.GenerationParams`."""
        return self.engine.generate(prompt, **params)

    def stream(self, prompt, **params):
        """Like generate, but yields TokenEvent / StepEvent as they are decided, then Done(result)."""
        return self.engine.stream(prompt, **params)

    # -- description ---------------------------------------------------------------------------
    @property
    def text_config(self) -> dict:
        return self.config.get("text_config", self.config)

    def info(self) -> dict:
        def count(module):
            """Weights as the float model had them: packed quantized weights count unpacked,
            their scales and biases not at all."""
            total = 0
            for _, m in module.named_modules():
                own = {k: v for k, v in m.items() if isinstance(v, mx.array)}
                bits = getattr(m, "bits", None) if "scales" in own else None
                for name, v in own.items():
                    if bits and name == "weight":
                        total += v.size * 32 // bits
                    elif not (bits and name in ("scales", "biases")):
                        total += v.size
            return total

        def nbytes(module):
            return sum(v.nbytes for _, v in tree_flatten(module.parameters()))

        from .kernels import coverage, describe_coverage

        tc = self.text_config
        layers = self._inner.layers
        linear = sum(1 for layer in layers if getattr(layer, "is_linear", False))
        quant = self.config.get("quantization")
        dtype = next(
            (v.dtype for _, v in tree_flatten(self.trunk.parameters()) if v.dtype != mx.uint32), None
        )
        return {
            "name": self.name,
            "path": str(self.path),
            "family": tc.get("model_type", self.config.get("model_type")),
            "parameters": count(self.trunk) + (count(self.head) if self.head else 0),
            "head_parameters": count(self.head) if self.head else 0,
            "layers": len(layers),
            "linear_attention_layers": linear,
            "hidden_size": tc.get("hidden_size"),
            "vocab_size": tc.get("vocab_size"),
            "has_mtp": self.has_mtp,
            "mtp_layers": len(self.head.layers) if self.head else 0,
            "dtype": str(dtype).replace("mlx.core.", "") if dtype else None,
            "quantization": f"{quant['bits']}-bit, group {quant['group_size']}" if quant else None,
            "weights_mb": round((nbytes(self.trunk) + (nbytes(self.head) if self.head else 0)) / 2**20, 1),
            "verify_kernels": describe_coverage(_merge(coverage(self.trunk), coverage(self.head) if self.head else None)),
            "cpu_kernels": _with_head_steps(cpu_kernels.describe(self.trunk, self.head), self._head_draft_steps()),
            "device": str(mx.default_device()),
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        i = self.info()
        mtp = "MTP head" if self.has_mtp else "no MTP head"
        q = f", {i['quantization']}" if i["quantization"] else ""
        return (
            f"<mtpnb.Model {self.name}: {i['family']}, {i['parameters'] / 1e6:.1f}M params, "
            f"{i['layers']} layers ({i['linear_attention_layers']} linear-attention), {mtp}, "
            f"{i['dtype']}{q}, {i['weights_mb']} MB>"
        )


def _with_head_steps(described: str | None, head_steps) -> str | None:
    if not (described and head_steps):
        return described
    read_as = " (its matrices read as bfloat16)" if head_steps.bf16 else ""
    return f"{described}; the head's draft steps in C{read_as}"


def _merge(a: dict, b: dict | None) -> dict:
    return a if b is None else {k: round(a[k] + b[k], 1) for k in a}


class DraftVocabulary:
    """What one generation's head drafts from: the model's shortlist (Model.set_draft_vocab), then up
    to `room` tokens of the generation's own context outside it, in the order they came (the prompt's,
    most recent first, then each token the generation commits). Code repeats the identifiers and strings
    of its context, which a frequency list of the training corpus misses: the ~9 tokens a generation adds
    this way on the default model's held-out function prompts gave nearly the acceptance of the whole
    vocabulary at the cost of the shortlist. Exact as the shortlist is: each round's drafts and its acceptance read
    the same q, and the vocabulary grows only between rounds, by committed tokens.

    Its `width` stays Vq + room however many tokens have joined: the columns past them are tokens outside
    it, with q = 0 (logits -inf), so that the compiled acceptance sees one shape per model, not a new one
    (a new trace, ~2 ms) at every token that joins."""

    def __init__(self, shortlist: mx.array, output_rows: mx.array, room: int):
        self.shortlist = shortlist
        self.room = min(room, output_rows.shape[0] - shortlist.size)  # there are no more tokens to add
        self.width = shortlist.size + self.room
        self._output_rows = output_rows  # the output layer's weight [V, H], whose rows the added tokens get
        self._listed = np.zeros(output_rows.shape[0], dtype=bool)
        self._listed[np.asarray(shortlist)] = True
        self.added: list[int] = []
        self._ids = self._rows = None  # built when first read after a change

    def add(self, tokens) -> None:
        """Context tokens (the prompt's, then committed ones): each one not drafted from yet joins while
        there is room."""
        for token in tokens:
            if len(self.added) >= self.room:
                return
            if not self._listed[token]:
                self._listed[token] = True
                self.added.append(token)
                self._ids = self._rows = None

    @property
    def ids(self) -> mx.array:
        """Each column's token id [width]: the shortlist's, the added ones, then tokens outside both (q = 0)."""
        if self._ids is None:
            outside = np.flatnonzero(~self._listed)[: self.width - self.shortlist.size - len(self.added)]
            self._ids = mx.concatenate([self.shortlist, mx.array(self.added, dtype=mx.int32),
                                        mx.array(outside, dtype=mx.int32)])
        return self._ids

    def context_rows(self) -> mx.array | None:
        """The output layer's rows of the added tokens [added, H] (None: none added)."""
        if not self.added:
            return None
        if self._rows is None:
            self._rows = self._output_rows[mx.array(self.added, dtype=mx.int32)]
            mx.eval(self._rows)
        return self._rows

    def pad(self, logits: mx.array) -> mx.array:
        """Logits [..., Vq + added] -> [..., width], -inf past the added tokens."""
        missing = self.width - logits.shape[-1]
        return logits if not missing else mx.concatenate(
            [logits, mx.full((*logits.shape[:-1], missing), -mx.inf, dtype=logits.dtype)], axis=-1)
