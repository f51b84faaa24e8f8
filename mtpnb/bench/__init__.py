"""Benchmarks: MTP depths against plain decoding and mlx-lm, side by side, with a cost model.

    python -m mtpnb.bench [MODEL] [--quick] [--json PATH] [--html PATH]
    mtpnb bench ...  /  %mtp bench ...          (the same code: add_bench_arguments, main, run_bench)

What one run does, in one process on one loaded model:

1. Cost model. With the trunk's caches warm at a realistic context length (a code prompt plus half the
   generation), it times a trunk forward of M tokens, t_verify(M), for M = 1..D+1 (t_1 = t_verify(1) is
   one plain decode step's forward), the draft steps as the engine takes them (`engine.draft`: the head's
   layer, its logits over the draft vocabulary, then argmax at greedy or the processed log-probabilities
   and a draw when sampling; in C where the head kernel applies): a round's first step over one pending
   position, t_draft, and each later step, t_later; and the acceptance of K drafts with its host sync,
   t_accept(K). Every time is wall time around an `mx.eval` barrier, median of repeats.
   The speedup bound of depth D is  E[tokens per verify] / ((t_verify(D+1) + t_draft + (D-1) t_later) / t_1)
   with E[tokens per verify] = 1 + mean accepted drafts per verify, measured in the runs.
2. Runs. For every repeat, prompt and temperature: mlx-lm's `stream_generate` (plain decoding of the same
   trunk, same sampler settings), then mtpnb at depth 0, 1, ..., D, one after another (the order turns
   round every repeat), so that drift on a shared machine touches every configuration alike. Decode tok/s
   = (tokens - 1) / (time of the last token - time of the first), taken by the consumer of the stream for
   both engines; end-to-end tok/s = tokens / whole call, prefill included; TTFT = time to the first token.
   Speedups are paired per repeat (depth d / depth 0 of the same repeat), then the median. A completion
   loops when some 8-token span occurs 3+ times in it (mtpnb.metrics.loops, the quality evaluation's
   definition): a loop is easy to draft, so every row also gives its share of looping completions and the
   speedup over the prompts whose completions loop neither there nor at depth 0; two compared models whose
   loop shares differ widely get a note saying which speedup is largely its loops'.
3. Phases. One extra run per configuration on an engine that profiles (`Engine(model, profile=True)`: every
   phase ends in an eval barrier and its time is on the StepEvent) splits the
   decode window into: draft (the head's D steps and their drafting ops, to the barrier: StepEvent.draft_s),
   verify forward (the trunk over D+1 tokens, barrier included), acceptance + sync (the acceptance ops on
   the verify's logits and the one transfer of the decision to the host, `engine.to_host`; at depth 0
   the token's choice and `engine.token_to_host`), rollback
   (building the caches' rollback, `rollback.rollback_cache`), detokenization (the streaming detokenizer for
   output tokens and `decode` for rejected drafts, replayed and timed apart) and Python overhead (the
   rest: events, stop checks, bookkeeping, generator hops). The barrier serializes depth 0's pipeline,
   so the phases say where the work goes and the timed runs how fast it goes.

Prompts: the opening of a function in each module the default model holds out of training (the folder's
manifest.json, else mtpnb.train.corpus.HELDOUT_MODULES), read from this interpreter's standard library:
the prompt ends after the `def` line, so the model continues with a function body. A fixed list of small
code prompts stands in where the standard library's source is missing.

The package's rooms: prompts (the code prompts), costs (the cost model), runs (one timed generation,
the phase profile, the alternated schedule), stats (medians, rates, the parity test), suite
(`run_bench`: all of it into a BenchReport), report (table, figures, JSON, HTML), cli (the options).
It uses the engine's public surface only: Engine, draft, next_token, to_host, token_to_host and
mtpnb.rollback.rollback_cache.
"""

from .cli import DESCRIPTION, add_bench_arguments, build_parser, compare_blas, main, run_from_args
from .costs import expected_tokens_per_verify, measure_costs, speedup_bound
from .prompts import code_prompts, heldout_modules
from .report import BenchReport
from .runs import PHASE_DOC, PHASES
from .stats import median, non_looping_speedup, parity
from .suite import FULL, QUICK, SCHEMA, loop_notes, run_bench

__all__ = ["DESCRIPTION", "FULL", "PHASES", "PHASE_DOC", "QUICK", "SCHEMA", "BenchReport", "add_bench_arguments", "build_parser",
           "code_prompts", "compare_blas", "expected_tokens_per_verify", "heldout_modules", "loop_notes",
           "main", "measure_costs", "median", "non_looping_speedup", "parity", "run_bench", "run_from_args", "speedup_bound"]
