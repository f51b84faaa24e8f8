"""Multi-turn prefix reuse: the time to the first token of each turn of a 6-turn conversation with a
PromptCache (each turn starts from the state the previous one left) and without (each turn prefills
its whole history), in the same run, and whether the greedy output is the same.

    python benchmarks/prefix_reuse.py                        # the default model, depth 3
    python benchmarks/prefix_reuse.py --depth 0 --repeats 5 --json out.json

The conversation: a system prompt holding a piece of mtpnb's own source (about --context-tokens
tokens), then six questions about it; each answer is --answer-tokens greedy tokens and goes into the
history, so turn 6's prompt reaches >= 3,000 tokens (checked). Each repeat replays the conversation
with a fresh cache; every turn's prompt is also generated without a cache, right after or right
before (alternating), and the two outputs compared. Goal: turn 6's TTFT with reuse <= 1/4 of without.
Timing needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mtpnb.loading import load
from mtpnb.prompt_cache import PromptCache

QUESTIONS = [
    "What does GenerationStream.run do, step by step?",
    "How are stop strings held back before they reach a consumer?",
    "Explain what _release waits for and why.",
    "Write a test for the max_tokens cut in the middle of a verify step.",
    "How would you add a new figure to the metrics?",
    "Summarize the whole module in five bullet points.",
]


def context(model, tokens: int) -> str:
    """About `tokens` tokens of mtpnb's own source (stream.py, then engine.py)."""
    root = Path(__file__).resolve().parent.parent / "mtpnb"
    # enough source for `tokens`, not so much that encoding it passes the model's context
    text = ((root / "stream.py").read_text() + (root / "engine.py").read_text())[: 5 * tokens]
    ids = model.tokenizer.encode(text)[:tokens]
    return "You answer questions about this Python code:\n\n" + model.tokenizer.decode(ids)


def conversation(model, system: str, depth: int, answer_tokens: int, cache_first: bool):
    """One replay: per turn (prompt tokens, TTFT with the cache, TTFT without, cached tokens, same output)."""
    cache = PromptCache()
    messages, rows = [{"role": "system", "content": system}], []
    for turn, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        runs = {}
        for use_cache in ((True, False) if cache_first == (turn % 2 == 1) else (False, True)):
            runs[use_cache] = model.generate(messages, depth=depth, max_tokens=answer_tokens,
                                             cache=cache if use_cache else None)
        with_cache, without = runs[True], runs[False]
        rows.append({"turn": turn, "prompt_tokens": with_cache.metrics.prompt_tokens,
                     "cached_tokens": with_cache.metrics.cached_prompt_tokens,
                     "ttft_with_s": with_cache.metrics.ttft_s, "ttft_without_s": without.metrics.ttft_s,
                     "same_output": with_cache.tokens == without.tokens})
        messages.append({"role": "assistant", "content": with_cache.text})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder or hub id (default: the embedded default model)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--context-tokens", type=int, default=2200)
    parser.add_argument("--answer-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write every row here")
    args = parser.parse_args(argv)

    model = load(args.model)
    system = context(model, args.context_tokens)
    model.generate("warm up", depth=args.depth, max_tokens=8)
    replays = [conversation(model, system, args.depth, args.answer_tokens, cache_first=r % 2 == 0)
               for r in range(args.repeats)]

    print(f"{model.name}, depth {args.depth}, {args.repeats} replays (median TTFT)")
    print("turn  prompt  cached   TTFT with   TTFT without   ratio   same output")
    for turn in range(len(QUESTIONS)):
        rows = [replay[turn] for replay in replays]
        with_s = statistics.median(r["ttft_with_s"] for r in rows)
        without_s = statistics.median(r["ttft_without_s"] for r in rows)
        print(f"{turn + 1:>4}  {rows[0]['prompt_tokens']:>6}  {rows[0]['cached_tokens']:>6}  {with_s * 1e3:>8.1f} ms"
              f"  {without_s * 1e3:>10.1f} ms  {with_s / without_s:>6.3f}   {all(r['same_output'] for r in rows)}")
    last = [replay[-1] for replay in replays]
    ratio = statistics.median(r["ttft_with_s"] for r in last) / statistics.median(r["ttft_without_s"] for r in last)
    same = all(r["same_output"] for replay in replays for r in replay)
    long_enough = last[0]["prompt_tokens"] >= 3000
    print(f"turn 6: {last[0]['prompt_tokens']} prompt tokens (>= 3000: {long_enough}), TTFT ratio {ratio:.3f} "
          f"(goal <= 0.25: {ratio <= 0.25}); greedy output identical in every turn: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.name, "depth": args.depth, "replays": replays,
                                               "turn6_ratio": ratio, "same_output": same}, indent=1))
    return 0 if same and long_enough else 1


if __name__ == "__main__":
    raise SystemExit(main())
