"""Train the default model: a Qwen3.5 hybrid trunk and its MTP head, on the corpus of `mtpnb.train.corpus`.

    python -m mtpnb.train --data artifacts/corpus --out OUT [--time-budget-s 420]   # the real run
    python -m mtpnb.train --smoke --out OUT                                         # CI, CPU, < 1 min

Up to three phases, each a plain loop (sample a batch, forward, loss, backward, clip, AdamW step):
1. joint: L = L_main + lambda * sum_k alpha_k * L_k, trunk and head together (cross-entropy on the
   real tokens; head step k is teacher-forced on x[t+k] and predicts x[t+k+1]);
2. unlikelihood (optional, --unlikelihood-fraction): a small model's greedy decoding falls into loops;
   sequence-level unlikelihood training (Welleck et al. 2019, "Neural text generation with unlikelihood
   training") lowers the probability of what the model repeats in its *own* greedy continuations:
   L = L_joint(real text) + beta * mean_t [-log(1 - p(x_t | x_<t))] over continuation tokens x_t that are
   part of a REPEAT_SPAN-token span at its second occurrence or later in that continuation (with
   --unlikelihood-occurrence 3, its third or later: where the quality evaluation counts a loop). The
   continuations are greedy, greedy and T=0.6 in turn with --unlikelihood-sampled, or T=0.6 alone with
   --unlikelihood-sampled-only (a model whose greedy loops are rare by then); their prefixes end
   anywhere in the training text, or with --own-prefixes function-body where a function's body starts, as
   the quality evaluation's prompts do (function: there and after a `def` line, as a bare signature);
   with several --unlikelihood-prefix lengths, of those lengths in turn (the evaluation's prompts run
   100-350 tokens, and loops grow with the context);
3. head: the trunk (embeddings and lm_head included) frozen, the head fitted by KL to the trunk's own
   next-token distribution at the position it drafts for; with --head-data own, on real text and on the
   model's own continuations (greedy and sampled), the text it drafts in use.
With --time-budget-s the step counts come from the budget: after CALIBRATION_STEPS steps the loop times
itself and fixes its last step, so the learning-rate schedule stays a function of the step.
Writes OUT in the Hugging Face layout (export.py), training.json and the model card.

Resumable (a lent GPU runs commands of a few minutes): with --checkpoint PATH the run starts from PATH
when it exists (weights, optimizer, step, phase, step counts, history, data-sampler state) and, with
--run-seconds S, stops after about S seconds, saves PATH and exports what it has to OUT (bf16) so that
the same command, run again, carries on where it stopped; it prints `finished` once all its phases are done.
The lent GPU hands back at most 8 files of < 16 MiB a run: with --max-shard-mib 15, copy out the shards,
model.safetensors.index.json, config.json and training.json; here, put the corpus's tokenizer and manifest
files beside them and join the shards with `python -m mtpnb.train.export`.

Gated DeltaNet kernels: without flash-linear-attention, transformers runs its torch reference code
(training.json's `linear_attention_kernels` says which ran). On an H200 with torch 2.11 / Triton 3.6, fla
0.6.0 refuses Triton's backward on Hopper (wrong results below Triton 3.7.1) but runs with tilelang: wheels
flash-linear-attention and fla-core 0.6.0, tilelang 0.1.15, apache-tvm-ffi 0.1.12, torch-c-dlpack-ext 0.1.5,
z3-solver 4.15.4.0 (`python3 -m pip install --no-deps`: there, a bare `pip` installs for another
interpreter). Seen there on this model's shape, 60 steps of batch 64 x 1024
from the same seed: the same losses as the reference code (4.382 at step 60), after about 2 minutes of kernel
compilation. Rate, joint loss of this shape at batch 64 x 1024 with fused AdamW (median step of the second
half of 300 steps, 2026-12-02): 281k tok/s with fla against 158k with the reference code, and the first fla
step takes about 125 s (compilation, once per held machine).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from .card import write_card
from .corpus import EOS_TOKEN, prepare
from .evaluate import heldout_metrics, windows
from .export import export, read_weights
from .model import MTPModel, build_config, count_parameters
from ..metrics import LOOP_SPAN
from ..metrics import loops as looping
from .tokenizer import load_tokenizer

CARD_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "full_attention_interval",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "intermediate_size",
    "layer_types",
)
CALIBRATION_STEPS = 20  # steps timed (after the first 5) to turn a time budget into a step count
SMOKE = {  # a toy corpus and a tiny model: the whole run takes seconds on a CPU
    "max_train_bytes": 300_000,
    "max_heldout_bytes": 40_000,
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 4,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 32,
    "linear_key_heads": 2,
    "linear_value_heads": 2,
    "linear_head_dim": 32,
    "intermediate_size": 128,
    "seq_len": 64,
    "batch_size": 4,
    "steps": 6,
    "head_steps": 4,
    "warmup_steps": 2,
    "eval_batches": 2,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtpnb.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write the trained model to")
    p.add_argument("--data", type=Path, help="corpus folder of `python -m mtpnb.train.corpus` (built if absent)")
    p.add_argument("--smoke", action="store_true", help="a few steps of a tiny model on a toy corpus (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("model")
    g.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size when the corpus is built")
    g.add_argument("--hidden-size", type=int, default=384)
    g.add_argument("--num-layers", type=int, default=8)
    g.add_argument("--full-attention-interval", type=int, default=4, help="every Nth layer is full attention")
    g.add_argument("--num-heads", type=int, default=6)
    g.add_argument("--num-kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--linear-key-heads", type=int, default=4)
    g.add_argument("--linear-value-heads", type=int, default=8)
    g.add_argument("--linear-head-dim", type=int, default=64)
    g.add_argument("--intermediate-size", type=int, default=896)
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=1024)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--depth", type=int, default=3, help="MTP steps trained (the head applied recursively)")
    g.add_argument("--mtp-lambda", type=float, default=0.5)
    g.add_argument("--mtp-decay", type=float, default=0.6, help="alpha_k proportional to decay^(k-1)")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--head-lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--steps", type=int, default=1000, help="joint steps (without --time-budget-s)")
    g.add_argument("--head-steps", type=int, default=200, help="head-only steps (without --time-budget-s)")
    g.add_argument("--time-budget-s", type=float, help="training seconds for all phases; sets the step counts")
    g.add_argument("--head-fraction", type=float, default=0.2, help="share of the budget for the head phase")
    g.add_argument("--unlikelihood-fraction", type=float, default=0.0,
                   help="share of the budget for the unlikelihood phase (0: none); joint gets what is left (none if 0)")
    g.add_argument("--unlikelihood-steps", type=int, default=0, help="unlikelihood steps (without --time-budget-s)")
    g.add_argument("--unlikelihood-lr", type=float, default=2e-4)
    g.add_argument("--unlikelihood-beta", type=float, default=1.0, help="weight of the unlikelihood term")
    g.add_argument("--unlikelihood-prefix", type=int, nargs="+", default=[128],
                   help="tokens of real text before a continuation; several: the pools of continuations take "
                        "them in turn (with --unlikelihood-sampled, each greedy and at T=0.6): a model fitted "
                        "against its loops after 128 tokens of context still loops after 300")
    g.add_argument("--unlikelihood-continuation", type=int, default=128, help="greedy tokens the model continues with")
    g.add_argument("--unlikelihood-pool", type=int, default=256,
                   help="continuations generated at a time (each step trains on batch-size of them)")
    g.add_argument("--unlikelihood-occurrence", type=int, choices=(2, 3), default=2,
                   help="penalize a repeated span from its 2nd occurrence on, or from its 3rd (where the "
                        "quality evaluation counts a loop; code writes many spans twice)")
    g.add_argument("--unlikelihood-sampled", action="store_true",
                   help="continuations greedy and at T=0.6 in turn (both loop rates), not greedy only")
    g.add_argument("--unlikelihood-sampled-only", action="store_true",
                   help="continuations at T=0.6 only: sampled text loops far less often than greedy text, so "
                        "in turn with greedy pools its few repeats are a small share of what is penalized")
    g.add_argument("--own-prefixes", choices=("anywhere", "function-body", "function"), default="anywhere",
                   help="where the model's own continuations start (unlikelihood, --head-data own): anywhere in "
                        "the training text; where a function's body starts (after its docstring, as the "
                        "quality evaluation's prompts end); or there and after a `def` line (as a bare "
                        "signature, the notebooks' `def fibonacci(n):`, asks for a body)")
    g.add_argument("--head-data", choices=("real", "own"), default="real",
                   help="the head phase's text: real text, or real text and the model's own continuations "
                        "(the unlikelihood prefix/continuation lengths, greedy and at T=0.6 in turn)")
    g = p.add_argument_group("logging and export")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--eval-every", type=int, default=200, help="held-out evaluation every N steps (0: at phase ends)")
    g.add_argument("--eval-batches", type=int, default=16, help="held-out batches per evaluation (0: all)")
    g.add_argument("--max-shard-mib", type=float, help="split the weights into files below this size")
    g = p.add_argument_group("resuming")
    g.add_argument("--checkpoint", type=Path, help="resume from this file if it exists; save it when stopping")
    g.add_argument("--run-seconds", type=float, help="stop this invocation after about this many seconds")
    g.add_argument("--init-from", type=Path, help="start from the weights of an exported folder (no optimizer state)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command_line = shlex.join(_without_paths(argv))
    args.corpus_caps = {}
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.time_budget_s = None
        args.corpus_caps = {k: SMOKE[k] for k in ("max_train_bytes", "max_heldout_bytes")}
    return args


PATH_ARGS = ("--out", "--data", "--checkpoint", "--init-from")


def _without_paths(argv: list[str]) -> list[str]:
    """The command line minus paths, --run-seconds and their values (for the model card)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in PATH_ARGS:
            skip = True
        elif arg in ("--run-seconds",):
            skip = True
        elif not arg.startswith(tuple(f"{a}=" for a in (*PATH_ARGS, "--run-seconds"))):
            kept.append(arg)
    return kept


@dataclass
class Batches:
    """Random windows of `width` tokens from a token array held on the device."""

    tokens: torch.Tensor
    width: int
    batch_size: int
    generator: torch.Generator

    @classmethod
    def create(cls, tokens: np.ndarray, width: int, batch_size: int, device: str, seed: int) -> "Batches":
        generator = torch.Generator(device=device).manual_seed(seed)
        return cls(torch.from_numpy(tokens.astype(np.int64)).to(device), width, batch_size, generator)

    def next(self) -> torch.Tensor:
        starts = torch.randint(
            0, len(self.tokens) - self.width + 1, (self.batch_size, 1), generator=self.generator, device=self.tokens.device
        )
        return self.tokens[starts + torch.arange(self.width, device=self.tokens.device)]


def lr_at(step: int, peak: float, warmup: int, last: int, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to min_ratio * peak at step `last`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, last - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params: list[torch.nn.Parameter], weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not norms, biases, A_log, dt_bias)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device == "cuda")


def joint_loss(model: MTPModel, batch: torch.Tensor, seq_len: int, alpha: list[float], mtp_lambda: float):
    """L_main + lambda * sum_k alpha_k L_k over a batch of seq_len + depth + 1 tokens per row."""
    vocab = model.config.vocab_size
    hidden, logits = model.trunk_forward(batch[:, :seq_len])
    loss_main = F.cross_entropy(logits.float().view(-1, vocab), batch[:, 1 : seq_len + 1].reshape(-1))
    loss_mtp = [
        F.cross_entropy(step.float().view(-1, vocab), batch[:, k + 1 : k + 1 + seq_len].reshape(-1))
        for k, step in enumerate(model.mtp_steps(hidden, batch, len(alpha)), start=1)
    ]
    loss = loss_main + mtp_lambda * sum(a * l for a, l in zip(alpha, loss_mtp))
    return loss, loss_main, loss_mtp


def head_loss(model: MTPModel, batch: torch.Tensor, seq_len: int, alpha: list[float]):
    """sum_k alpha_k KL(trunk's distribution at position t+k || head step k at row t), trunk frozen."""
    depth = len(alpha)
    with torch.no_grad():
        hidden, logits = model.trunk_forward(batch[:, : seq_len + depth])
        target = F.log_softmax(logits.float(), dim=-1)
    hidden = hidden[:, :seq_len]
    loss_mtp = [
        F.kl_div(F.log_softmax(step.float(), dim=-1), target[:, k : k + seq_len], log_target=True, reduction="none")
        .sum(-1)
        .mean()
        for k, step in enumerate(model.mtp_steps(hidden, batch, depth), start=1)
    ]
    return sum(a * l for a, l in zip(alpha, loss_mtp)), None, loss_mtp


def head_loss_own(model: MTPModel, batch: torch.Tensor, own: OwnContinuations, args, alpha: list[float]):
    """head_loss on a batch of real text plus head_loss on a batch of the model's own continuations."""
    loss, _, loss_mtp = head_loss(model, batch, args.seq_len, alpha)
    ids = own.next(args.batch_size)[0]
    own_loss, _, own_mtp = head_loss(model, ids, ids.shape[1] - len(alpha) - 1, alpha)
    return loss + own_loss, None, [(a + b) / 2 for a, b in zip(loss_mtp, own_mtp)]


REPEAT_SPAN = LOOP_SPAN  # a loop's unit, as the quality evaluation counts it


def repeated_spans(ids: torch.Tensor, start: int, eos: int, span: int = REPEAT_SPAN,
                   occurrence: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(repeated, valid), bool [B, L]: `valid` marks the continuation ids[:, start:] up to and with its first
    `eos`; `repeated` the valid tokens inside a `span`-token window at its `occurrence`-th occurrence in it
    or later (2: every repeat; 3: from where the quality evaluation calls it a loop, so that a span that
    real code writes twice is not penalized)."""
    repeated = torch.zeros(ids.shape, dtype=torch.bool)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids[:, start:].tolist()):
        end = row.index(eos) + 1 if eos in row else len(row)
        valid[b, start : start + end] = True
        seen = {}
        for i in range(end - span + 1):
            window = tuple(row[i : i + span])
            seen[window] = seen.get(window, 0) + 1
            if seen[window] >= occurrence:
                repeated[b, start + i : start + i + span] = True
    return repeated.to(ids.device), valid.to(ids.device)


def loop_rate(ids: torch.Tensor, valid: torch.Tensor, start: int) -> float:
    """The quality evaluation's loop rate of the continuations ids[:, start:], each up to its end (`valid`,
    as repeated_spans marks it): the end-of-text padding after a continuation that ended early is no loop."""
    lengths = valid[:, start:].sum(dim=1).tolist()
    return sum(looping(row[:n]) for row, n in zip(ids[:, start:].tolist(), lengths)) / len(lengths)


OWN_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}  # the quality evaluation's sampled setting


def own_pool_plan(generation: int, prefixes: list[int], sampling: str) -> tuple[int, dict]:
    """(prefix length, sampling) of the `generation`-th pool of own continuations: the prefix lengths in
    turn, each greedy ("greedy"), OWN_SAMPLING ("sampled"), or ("both") twice, greedy then OWN_SAMPLING,
    so that every length gets both."""
    if sampling == "both":
        return prefixes[(generation // 2) % len(prefixes)], OWN_SAMPLING if generation % 2 else {}
    return prefixes[generation % len(prefixes)], OWN_SAMPLING if sampling == "sampled" else {}


def unlikelihood_sampling(args: argparse.Namespace) -> str:
    """The unlikelihood phase's own_pool_plan sampling, from its two flags."""
    return "sampled" if args.unlikelihood_sampled_only else "both" if args.unlikelihood_sampled else "greedy"


def _token_pieces(tokenizer) -> tuple[list[str], np.ndarray]:
    """Every token's text, and which tokens are the keyword `def`."""
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
    return pieces, np.array([p.strip() == "def" for p in pieces])


def function_body_starts(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """Positions in `tokens` where a function's body starts: right after the line that closes its
    docstring, where the quality evaluation's prompts end. Found on the tokens themselves: the second
    `\"\"\"` since the last `def` token (no end of file between) ends a token whose line ends there, in that
    token or in the next one (a bare line end; small vocabularies keep it apart). A bare string later in a
    body passes too; that is rare, and still a place where a body goes on."""
    pieces, is_def = _token_pieces(tokenizer)
    quotes = np.array([p.count('"""') for p in pieces])
    ends_quote = np.array([p.rstrip("\r\n").endswith('"""') for p in pieces])
    ends_line = np.array([p.endswith(("\n", "\r")) for p in pieces])
    bare_line_end = np.array([bool(p) and not p.strip("\r\n") for p in pieces])
    position = np.arange(len(tokens))
    last_def = np.maximum.accumulate(np.where(is_def[tokens], position, -1))
    last_eos = np.maximum.accumulate(np.where(tokens == tokenizer.token_to_id(EOS_TOKEN), position, -1))
    quotes_so_far = np.cumsum(quotes[tokens])
    line_end_next = np.append(bare_line_end[tokens[1:]], False)
    closing = np.flatnonzero(ends_quote[tokens] & (ends_line[tokens] | line_end_next) & (last_def > last_eos))
    closing = closing[quotes_so_far[closing] - quotes_so_far[last_def[closing]] == 2]
    return closing + np.where(ends_line[tokens[closing]], 1, 2)


def def_line_ends(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """Positions in `tokens` right after the first token holding a line end that follows a `def` token (no
    end of file between): where a bare signature (or the first line of a long one) asks for what comes next."""
    pieces, is_def = _token_pieces(tokenizer)
    has_line_end = np.array(["\n" in p or "\r" in p for p in pieces])
    line_ends = np.flatnonzero(has_line_end[tokens])
    defs = np.flatnonzero(is_def[tokens])
    after = np.searchsorted(line_ends, defs)
    defs, ends = defs[after < len(line_ends)], line_ends[after[after < len(line_ends)]] + 1
    eos = np.flatnonzero(tokens == tokenizer.token_to_id(EOS_TOKEN))
    same_file = np.searchsorted(eos, defs) == np.searchsorted(eos, ends)
    return np.unique(ends[same_file])


class OwnContinuations:
    """The model's own continuations of real-text prefixes: `pool` generated at a time (one batched
    generate is latency-bound, so a large pool costs about what a small one does), handed out `batch_size`
    at a time, regenerated from the current weights when used up. Greedy, OWN_SAMPLING, or greedy and
    OWN_SAMPLING pools in turn (`sampling`: own_pool_plan's), over the prefix lengths in turn. A prefix ends anywhere
    in the text, or with `prefix_ends` at one of those positions (function_body_starts, def_line_ends: where
    a prompt asks for a body)."""

    def __init__(self, model: MTPModel, tokens: np.ndarray, args, autocast, seed: int, history: list,
                 phase: str = "unlikelihood", sampling: str = "greedy", prefix_ends: np.ndarray | None = None):
        self.model, self.autocast, self.history = model, autocast, history
        self.phase, self.sampling = phase, sampling
        self.tokens = torch.from_numpy(tokens.astype(np.int64)).to(args.device)
        self.prefixes, self.continuation, self.pool = args.unlikelihood_prefix, args.unlikelihood_continuation, args.unlikelihood_pool
        self.occurrence = args.unlikelihood_occurrence
        self.prefix_ends = None if prefix_ends is None else torch.from_numpy(prefix_ends.astype(np.int64)).to(args.device)
        self.eos = model.config.eos_token_id
        self.generator = torch.Generator(device=self.tokens.device).manual_seed(seed)
        self.ids = self.repeated = self.valid = None
        self.used = self.generations = 0

    @torch.no_grad()
    def _generate(self) -> None:
        prefix, sampling = own_pool_plan(self.generations, self.prefixes, self.sampling)
        if self.prefix_ends is None:
            starts = torch.randint(0, len(self.tokens) - prefix, (self.pool, 1), generator=self.generator,
                                   device=self.tokens.device)
        else:
            ends = self.prefix_ends[self.prefix_ends >= prefix]
            pick = torch.randint(0, len(ends), (self.pool, 1), generator=self.generator, device=self.tokens.device)
            starts = ends[pick] - prefix
        prefixes = self.tokens[starts + torch.arange(prefix, device=self.tokens.device)]
        was_training = self.model.training
        self.model.eval()
        with self.autocast:
            ids = self.model.trunk.generate(
                input_ids=prefixes, attention_mask=torch.ones_like(prefixes), max_new_tokens=self.continuation,
                do_sample=bool(sampling), **sampling, pad_token_id=self.eos, eos_token_id=self.eos)
        self.model.train(was_training)
        ids = torch.nn.functional.pad(ids, (0, prefix + self.continuation - ids.shape[1]), value=self.eos)
        self.ids = ids
        self.repeated, self.valid = repeated_spans(ids, prefix, self.eos, occurrence=self.occurrence)
        self.used, self.generations = 0, self.generations + 1
        record = {"phase": self.phase, "generation": self.generations,
                  "own_continuations": {"sampling": "T=0.6" if sampling else "greedy", "prefix": prefix,
                                        "loop_rate": loop_rate(ids, self.valid, prefix),
                                        "repeated_share": float(self.repeated.sum() / self.valid.sum()),
                                        "mean_length": float(self.valid.sum() / len(ids))}}
        self.history.append(record)
        print(f"[{self.phase}] own continuations #{self.generations}: {json.dumps(record['own_continuations'])}",
              flush=True)

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.ids is None or self.used + batch_size > self.pool:
            self._generate()
        part = slice(self.used, self.used + batch_size)
        self.used += batch_size
        return self.ids[part], self.repeated[part], self.valid[part]


def unlikelihood_loss(model: MTPModel, batch: torch.Tensor, own: OwnContinuations, args, alpha: list[float]):
    """The joint loss on real text plus beta * the sequence-level unlikelihood of the model's own repeats:
    -log(1 - p(x_t | x_<t)) summed over repeated continuation tokens, per continuation token."""
    loss, loss_main, loss_mtp = joint_loss(model, batch, args.seq_len, alpha, args.mtp_lambda)
    ids, repeated, valid = own.next(args.batch_size)
    _, logits = model.trunk_forward(ids[:, :-1])
    p = F.softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    penalty = -torch.log1p(-p.clamp(max=1 - 1e-5))
    unlikely = (penalty * repeated[:, 1:]).sum() / valid[:, 1:].sum().clamp(min=1)
    return loss + args.unlikelihood_beta * unlikely, loss_main, loss_mtp


@dataclass
class Phase:
    name: str
    trains: str  # what the phase updates, for the model card
    loss_kind: str  # what loss_mtp measures: "cross-entropy" or "KL"
    loss: Callable  # batch -> (loss, loss_main or None, [loss_k])
    params: list[torch.nn.Parameter]
    lr: float
    steps: int
    budget_s: float | None  # when set, `steps` is replaced by what fits in it
    seed: int


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Progress:
    """Where training stands: what a checkpoint holds besides the weights."""

    phase: int = 0  # index into the phases
    step: int = 0  # steps done in that phase
    steps: dict | None = None  # phase name -> last step, once fixed (given or calibrated)
    wall_s: dict | None = None  # phase name -> training seconds so far (evaluations left out)
    history: list | None = None
    records: list | None = None
    optimizer: dict | None = None  # the current phase's optimizer state
    sampler: torch.Tensor | None = None  # the current phase's batch generator state


def run_phase(
    phase: Phase, model: MTPModel, data: np.ndarray, heldout_rows: torch.Tensor, args, autocast,
    progress: Progress, deadline: float | None,
) -> dict | None:
    """One training loop, from progress.step on; returns the phase's record (steps, tokens, timing, final
    train and held-out metrics), or None when `deadline` (perf_counter) came first: then `progress` holds
    the optimizer and sampler state to resume from. Time spent on held-out evaluations is left out of
    tokens_per_s."""
    history = progress.history
    batches = Batches.create(data, args.seq_len + args.depth + 1, args.batch_size, args.device, phase.seed)
    optimizer = adamw(phase.params, args.weight_decay, args.device)
    if progress.optimizer is not None:
        optimizer.load_state_dict(progress.optimizer)
        batches.generator.set_state(progress.sampler)
    steps = progress.steps.get(phase.name)
    if steps is None and phase.budget_s is None:
        steps = phase.steps
    last = max(steps, args.warmup_steps + 1) if steps is not None else None
    recent = []
    eval_s = 0.0
    model.train()
    sync(args.device)
    start = time.perf_counter()
    wall_before = progress.wall_s.get(phase.name, 0.0)
    step = progress.step
    first = step
    while steps is None or step < steps:
        if deadline is not None and time.perf_counter() > deadline and steps is not None:
            sync(args.device)
            progress.step = step
            progress.optimizer = optimizer.state_dict()
            progress.sampler = batches.generator.get_state()
            progress.wall_s[phase.name] = wall_before + time.perf_counter() - start - eval_s
            return None
        lr = lr_at(step, phase.lr, args.warmup_steps, last or 10**9, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss, loss_main, loss_mtp = phase.loss(batches.next())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(phase.params, args.grad_clip)
        optimizer.step()
        step += 1
        recent.append((None if loss_main is None else loss_main.detach(), [l.detach() for l in loss_mtp]))
        if step == first + 5:
            sync(args.device)
            calibration_start = time.perf_counter()
        if steps is None and step == first + CALIBRATION_STEPS:
            sync(args.device)
            now = time.perf_counter()
            per_step = (now - calibration_start) / (CALIBRATION_STEPS - 5)
            steps = step + max(0, int((phase.budget_s - (now - start)) / per_step))
            last = max(steps, args.warmup_steps + 1)
            progress.steps[phase.name] = steps
            print(f"[{phase.name}] {per_step * 1e3:.0f} ms/step: {steps} steps fit in {phase.budget_s:.0f} s", flush=True)
        if step % args.log_every == 0 or step == steps:
            means = {
                "loss_main": None if loss_main is None else float(np.mean([m.item() for m, _ in recent])),
                "loss_mtp": [float(np.mean([ls[k].item() for _, ls in recent])) for k in range(args.depth)],
            }
            recent.clear()
            elapsed = wall_before + time.perf_counter() - start - eval_s
            history.append({"phase": phase.name, "step": step, "elapsed_s": round(elapsed, 2), "lr": lr, **means})
            main = "frozen" if means["loss_main"] is None else f"{means['loss_main']:.3f}"
            print(
                f"[{phase.name}] step {step}/{steps} lr {lr:.2e} main {main} mtp "
                f"{' '.join(f'{v:.3f}' for v in means['loss_mtp'])} | "
                f"{(step - first) * batches.batch_size * args.seq_len / (time.perf_counter() - start - eval_s) / 1e3:.0f}k tok/s",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0 and step != steps:
            eval_start = time.perf_counter()
            heldout = heldout_metrics(model.eval(), heldout_rows, args.depth, args.batch_size, autocast)
            model.train()
            eval_s += time.perf_counter() - eval_start
            history.append({"phase": phase.name, "step": step, "heldout": heldout})
            print(f"[{phase.name}] step {step} held-out: {json.dumps(heldout)}", flush=True)
    sync(args.device)
    wall = wall_before + time.perf_counter() - start - eval_s
    tokens = step * args.batch_size * args.seq_len
    final = next(h for h in reversed(history) if "loss_mtp" in h)
    heldout = heldout_metrics(model.eval(), heldout_rows, args.depth, args.batch_size, autocast)
    print(f"[{phase.name}] held-out: {json.dumps(heldout)}", flush=True)
    progress.step, progress.optimizer, progress.sampler = 0, None, None
    return {
        "name": phase.name,
        "trains": phase.trains,
        "loss_kind": phase.loss_kind,
        "steps": step,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "lr": phase.lr,
        "final_train": {"loss_main": final["loss_main"], "loss_mtp": final["loss_mtp"]},
        "heldout": heldout,
    }


def save_checkpoint(path: Path, model: MTPModel, progress: Progress) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "progress": vars(progress)}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: MTPModel) -> Progress:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return Progress(**state["progress"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = None if args.run_seconds is None else started + args.run_seconds
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")
    if args.data is None:
        args.data = Path(tempfile.mkdtemp(prefix="mtpnb-corpus-"))
    if not (args.data / "train.npy").exists():
        prepare(args.data, vocab_size=args.vocab_size, **args.corpus_caps)
    manifest = json.loads((args.data / "manifest.json").read_text())
    train_tokens, heldout_tokens = np.load(args.data / "train.npy"), np.load(args.data / "heldout.npy")

    config = build_config(
        vocab_size=manifest["tokenizer"]["vocab_size"],
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        full_attention_interval=args.full_attention_interval,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        linear_num_key_heads=args.linear_key_heads,
        linear_num_value_heads=args.linear_value_heads,
        linear_head_dim=args.linear_head_dim,
    )
    model = MTPModel(config)
    if args.checkpoint is not None and args.checkpoint.exists():
        progress = load_checkpoint(args.checkpoint, model)
        print(f"resumed from {args.checkpoint}: phase {progress.phase}, step {progress.step}", flush=True)
    else:
        progress = Progress(steps={}, wall_s={}, history=[], records=[])
        if args.init_from is not None:
            state = {("" if n.startswith("mtp.") else "trunk.") + n: t for n, t in read_weights(args.init_from).items()}
            model.load_state_dict(state, strict=False)
            print(f"weights from {args.init_from}", flush=True)
    model = model.to(args.device)
    parameters = count_parameters(model)
    print(f"parameters: {parameters}", flush=True)
    use_bf16 = args.device == "cuda"
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=use_bf16)
    alpha = [args.mtp_decay**k for k in range(args.depth)]
    alpha = [a / sum(alpha) for a in alpha]
    heldout_rows = windows(heldout_tokens, args.seq_len, args.depth)
    if args.eval_batches:
        heldout_rows = heldout_rows[: args.eval_batches * args.batch_size]

    budget = args.time_budget_s
    joint_fraction = 1 - args.head_fraction - args.unlikelihood_fraction
    own = own_for_head = None
    unlikelihood = bool(args.unlikelihood_fraction or args.unlikelihood_steps)
    prefix_ends = None
    if args.own_prefixes != "anywhere" and (unlikelihood or args.head_data == "own"):
        tokenizer = load_tokenizer(args.data)
        prefix_ends = function_body_starts(train_tokens, tokenizer)
        if args.own_prefixes == "function":
            prefix_ends = np.union1d(prefix_ends, def_line_ends(train_tokens, tokenizer))
        if not (prefix_ends >= max(args.unlikelihood_prefix)).any():
            raise SystemExit(f"--own-prefixes {args.own_prefixes}: no place to start a continuation after "
                             f"{max(args.unlikelihood_prefix)} tokens of {args.data}'s training text")
        print(f"own continuations start at {len(prefix_ends)} places ({args.own_prefixes})", flush=True)
    if unlikelihood:
        own = OwnContinuations(model, train_tokens, args, autocast, args.seed + 3, progress.history,
                               sampling=unlikelihood_sampling(args), prefix_ends=prefix_ends)
    if args.head_data == "own":
        own_for_head = OwnContinuations(model, train_tokens, args, autocast, args.seed + 5, progress.history,
                                        phase="head", sampling="both", prefix_ends=prefix_ends)
    phases = [
        Phase(
            name="joint",
            trains="trunk + head",
            loss_kind="cross-entropy",
            loss=lambda batch: joint_loss(model, batch, args.seq_len, alpha, args.mtp_lambda),
            params=list(model.parameters()),
            lr=args.lr,
            steps=args.steps,
            budget_s=None if budget is None else budget * joint_fraction,
            seed=args.seed + 1,
        ),
        Phase(
            name="unlikelihood",
            trains="trunk + head",
            loss_kind="cross-entropy",
            loss=lambda batch: unlikelihood_loss(model, batch, own, args, alpha),
            params=list(model.parameters()),
            lr=args.unlikelihood_lr,
            steps=args.unlikelihood_steps,
            budget_s=None if budget is None else budget * args.unlikelihood_fraction,
            seed=args.seed + 4,
        ),
        Phase(
            name="head",
            trains="head",
            loss_kind="KL",
            loss=(lambda batch: head_loss_own(model, batch, own_for_head, args, alpha)) if own_for_head
            else (lambda batch: head_loss(model, batch, args.seq_len, alpha)),
            params=list(model.mtp.parameters()),
            lr=args.head_lr,
            steps=args.head_steps,
            budget_s=None if budget is None else budget * args.head_fraction,
            seed=args.seed + 2,
        ),
    ]
    # a phase given no steps or no time is left out (fine-tuning from --init-from needs no joint phase)
    phases = [p for p in phases if (p.steps if p.budget_s is None else p.budget_s) > 0]
    while progress.phase < len(phases):
        phase = phases[progress.phase]
        if phase.name == "head":
            model.trunk.requires_grad_(False)
        record = run_phase(phase, model, train_tokens, heldout_rows, args, autocast, progress, deadline)
        if record is None:
            break
        progress.records.append(record)
        progress.phase += 1
    finished = progress.phase == len(phases)
    if args.checkpoint is not None and not finished:
        save_checkpoint(args.checkpoint, model, progress)

    export_dtype = torch.bfloat16
    max_shard = None if args.max_shard_mib is None else int(args.max_shard_mib * 2**20)
    export(model, args.out, args.data, export_dtype, max_shard)
    records = progress.records
    training = {
        "hyperparameters": {
            **{k: v for k, v in vars(args).items() if not isinstance(v, Path) and k not in ("run_seconds", "corpus_caps")},
            "mtp_alpha": alpha,
            "autocast": use_bf16,
            "export_dtype": str(export_dtype).removeprefix("torch."),
        },
        "model": {
            "parameters": parameters,
            "config": {k: getattr(config, k) for k in CARD_CONFIG_KEYS},
        },
        "train_tokens": int(len(train_tokens)),
        "corpus": {
            "python": manifest["python"],
            "heldout_modules": manifest["heldout_modules"],
            "heldout_packages": manifest.get("heldout_packages", []),
            "train_sources": len(manifest.get("train_sources", [])),
            **manifest["totals"],
            **({"subset": manifest["subset"]} if "subset" in manifest else {}),
        },
        "hardware": {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "linear_attention_kernels": _linear_attention_kernels(),
            "python": platform.python_version(),
        },
        "base": _base_training(args.init_from),
        "finished": finished,
        "wall_s": sum(r["wall_s"] for r in records),
        "phases": records,
        "history": progress.history,
    }
    (args.out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    if records:
        write_card(args.out)
    print(f"wrote {args.out}", flush=True)
    print("finished" if finished else f"stopped in phase {phases[progress.phase].name} at step {progress.step}: "
          "run the same command again to carry on", flush=True)


def _base_training(init_from: Path | None) -> dict | None:
    """The training record of the model a fine-tuning run started from (its lineage, for the card)."""
    if init_from is None or not (Path(init_from) / "training.json").exists():
        return None
    return json.loads((Path(init_from) / "training.json").read_text())


def _linear_attention_kernels() -> str:
    """Which Gated DeltaNet kernels transformers picked: flash-linear-attention's, or its torch fallback."""
    try:
        import fla  # noqa: F401

        return f"flash-linear-attention (fla {getattr(fla, '__version__', '?')})"
    except ImportError:
        return "torch fallback"
