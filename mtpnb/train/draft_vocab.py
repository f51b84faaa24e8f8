"""The draft vocabulary of a model folder: the token ids its MTP head drafts from, most frequent first.

    python -m mtpnb.train.draft_vocab CORPUS_DIR MODEL_DIR [--size 4096]

Counts the tokens of the training corpus (`train.npy`, written by `mtpnb.train.corpus`) and writes
`draft_vocab.json` into the model folder; `mtpnb.load` picks it up (see Model.set_draft_vocab).

The size trades acceptance for the draft step's cost: a token outside the draft vocabulary can never be
drafted, and every id in it is one more row of lm_head for each draft step to read. Measured on the
default model (2 CPU cores, 2026-12-02): 2048 ids cover 88.5% of the corpus tokens, 4096 cover 96.6%;
tokens per verify at depth 3 on 24 held-out function headers, greedy, 2.51 with 2048, 2.70 with 4096,
2.75 with all 8192; decode speed with 4096 the same as with 2048 within the noise, the whole vocabulary
slower at T=0.6 (a 4x larger draft matmul and sampling over it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def draft_vocab(tokens: np.ndarray, vocab_size: int, size: int) -> tuple[list[int], float]:
    """The `size` most frequent ids (ties by id) and the share of the corpus they cover."""
    counts = np.bincount(tokens, minlength=vocab_size)
    ranked = np.argsort(-counts, kind="stable")[:size]
    return sorted(int(i) for i in ranked), float(counts[ranked].sum() / counts.sum())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtpnb.train.draft_vocab", description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="folder with train.npy")
    parser.add_argument("model", type=Path, help="model folder to write draft_vocab.json into")
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args(argv)
    vocab_size = json.loads((args.model / "config.json").read_text())["vocab_size"]
    ids, coverage = draft_vocab(np.load(args.corpus / "train.npy"), vocab_size, args.size)
    (args.model / "draft_vocab.json").write_text(json.dumps({
        "ids": ids,
        "source": f"the {args.size} most frequent tokens of the training corpus ({coverage:.1%} of its tokens)",
    }))
    print(f"{args.model / 'draft_vocab.json'}: {args.size} ids, {coverage:.1%} of the corpus tokens")


if __name__ == "__main__":
    main()
