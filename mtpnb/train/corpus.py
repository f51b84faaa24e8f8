"""The training corpus: the Python standard library's own source, on every machine, no download.

Selection (deterministic for a given interpreter; recorded in `manifest.json`):
- every `*.py` under `sysconfig.get_paths()["stdlib"]`, in sorted path order;
- except what is not the standard library (`site-packages`, `dist-packages`), byte-code caches, and two
  generated packages that read as data rather than code (`encodings`: codec tables, `pydoc_data`: one
  huge dict of help text);
- except files that are not UTF-8 or do not parse under the running interpreter (test fixtures with
  deliberate syntax errors, Python 2 samples, legacy encodings);
- the test suite, idlelib, tkinter and lib2to3 stay in: they are ordinary Python and more than double
  the corpus, which matters more here than their style;
- a fixed list of held-out modules (HELDOUT_MODULES) is kept out of training, together with their own
  tests (`test/test_<name>.py`, `test/test_<name>/`), and is the evaluation text.

`prepare()` trains the tokenizer on the training files only and packs both splits into uint16 token
arrays, each file followed by `<|endoftext|>`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import platform
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"})
# Pure-Python modules present in every CPython from 3.10 on, of ordinary style, ~1% of the corpus.
HELDOUT_MODULES = (
    "bisect",
    "calendar",
    "colorsys",
    "difflib",
    "fractions",
    "graphlib",
    "heapq",
    "json",
    "pprint",
    "shlex",
    "statistics",
    "string",
    "textwrap",
)


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib folder, POSIX separators
    sha256: str
    bytes: int


@dataclass
class Selection:
    train: list[SourceFile]
    heldout: list[SourceFile]
    unparsable: list[str]  # skipped: not UTF-8, or a syntax error under this interpreter


def _is_heldout(parts: tuple[str, ...]) -> bool:
    """`parts` of a path relative to the stdlib: a held-out module, or its own tests."""
    top = parts[0].removesuffix(".py")
    if top in HELDOUT_MODULES:
        return True
    if top == "test" and len(parts) > 1:
        name = parts[1].removesuffix(".py")
        return name.startswith("test_") and name.removeprefix("test_") in HELDOUT_MODULES
    return False


def _parses(data: bytes) -> bool:
    try:
        ast.parse(data.decode("utf-8"))
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return False
    return True


def select(root: Path = STDLIB, max_train_bytes: int | None = None, max_heldout_bytes: int | None = None) -> Selection:
    """Walk `root` and split its Python files into training and held-out files.

    `max_*_bytes` cap a split at its leading files (in path order) that fit: the smoke run's toy corpus.
    """
    selection = Selection(train=[], heldout=[], unparsable=[])
    caps = {"train": max_train_bytes, "heldout": max_heldout_bytes}
    sizes = {"train": 0, "heldout": 0}
    full: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        split = "heldout" if _is_heldout(rel.parts) else "train"
        if split in full:
            continue
        if caps[split] is not None and sizes[split] + path.stat().st_size > caps[split]:
            full.add(split)
            continue
        data = path.read_bytes()
        if not _parses(data):
            selection.unparsable.append(rel.as_posix())
            continue
        getattr(selection, split).append(SourceFile(rel.as_posix(), hashlib.sha256(data).hexdigest(), len(data)))
        sizes[split] += len(data)
    return selection


def _pack(tokenizer, texts: list[str]) -> np.ndarray:
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def prepare(
    out_dir: Path,
    vocab_size: int = 8192,
    model_max_length: int = 4096,
    max_train_bytes: int | None = None,
    max_heldout_bytes: int | None = None,
    root: Path = STDLIB,
) -> dict:
    """Select the corpus, train the tokenizer, write tokenizer files, token arrays and the manifest.

    `max_*_bytes` cap each split as in `select`. Returns the manifest.
    """
    out_dir = Path(out_dir)
    selection = select(root, max_train_bytes, max_heldout_bytes)
    train, heldout = selection.train, selection.heldout
    read = lambda f: (root / f.path).read_text(encoding="utf-8")  # noqa: E731
    train_texts = [read(f) for f in train]
    heldout_texts = [read(f) for f in heldout]
    tokenizer = train_tokenizer(train_texts, vocab_size)
    save_tokenizer(tokenizer, out_dir, model_max_length)
    train_ids, heldout_ids = _pack(tokenizer, train_texts), _pack(tokenizer, heldout_texts)
    np.save(out_dir / "train.npy", train_ids)
    np.save(out_dir / "heldout.npy", heldout_ids)
    manifest = {
        "python": platform.python_version(),
        "stdlib": str(root),
        "rules": {
            "include": "*.py under the stdlib folder, sorted by relative path",
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "excluded_files": "not UTF-8, or ast.parse fails under this interpreter",
            "heldout": "top-level modules/packages in heldout_modules and test/test_<name>[.py|/]",
            "separator": EOS_TOKEN + " after every file",
            "capped": {"max_train_bytes": max_train_bytes, "max_heldout_bytes": max_heldout_bytes},
        },
        "heldout_modules": list(HELDOUT_MODULES),
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": tokenizer.get_vocab_size()},
        "totals": {
            "train_files": len(train),
            "train_bytes": sum(f.bytes for f in train),
            "train_tokens": int(train_ids.size),
            "heldout_files": len(heldout),
            "heldout_bytes": sum(f.bytes for f in heldout),
            "heldout_tokens": int(heldout_ids.size),
        },
        "train": [asdict(f) for f in train],
        "heldout": [asdict(f) for f in heldout],
        "unparsable": selection.unparsable,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mtpnb.train.corpus",
        description="Build the stdlib corpus: tokenizer files, train.npy, heldout.npy, manifest.json.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-train-bytes", type=int)
    parser.add_argument("--max-heldout-bytes", type=int)
    args = parser.parse_args(argv)
    manifest = prepare(
        args.out_dir, args.vocab_size, max_train_bytes=args.max_train_bytes, max_heldout_bytes=args.max_heldout_bytes
    )
    print(json.dumps(manifest["totals"]))


if __name__ == "__main__":
    main()
