"""Code prompts: the opening of a function in each module the default model holds out of training
(its manifest.json, else mtpnb.train.corpus.HELDOUT_MODULES), read from this interpreter's standard
library: the prompt ends after the `def` line, so the model continues with a function body. A fixed
list of small code prompts stands in where the standard library's source is missing."""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

FALLBACK_PROMPTS = (
    ("fallback:fib", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("fallback:lru", "class LRUCache:\n    def __init__(self, capacity):\n"),
    ("fallback:parse", "import re\n\n\ndef parse_args(line):\n    \"\"\"Split a command line into words.\"\"\"\n"),
    ("fallback:merge", "def merge_sorted(a, b):\n"),
)


def heldout_modules(model_path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The default model's held-out modules: its manifest.json, else the training corpus's list."""
    if model_path is not None:
        manifest = Path(model_path) / "manifest.json"
        try:
            modules = json.loads(manifest.read_text()).get("heldout_modules")
            if modules:
                return tuple(modules)
        except (OSError, ValueError):
            pass
    from ..train.corpus import HELDOUT_MODULES  # numpy + tokenizers only, no torch

    return tuple(HELDOUT_MODULES)


def code_prompts(count: int = 6, prompt_chars: int = 800, modules: Sequence[str] | None = None,
                 stdlib: str | os.PathLike | None = None) -> list[dict]:
    """Code prompts [{"name", "text"}]: in each module, the first function that starts at least
    `prompt_chars` into the file and whose body spans 8+ lines; the prompt is the `prompt_chars` before the
    body (snapped to a line start), so it ends with the `def` line(s)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    prompts = []
    for module in modules or heldout_modules():
        if len(prompts) >= count:
            break
        path = next((p for p in (root / f"{module}.py", root / module / "__init__.py") if p.is_file()), None)
        if path is None:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
        starts = [0]
        for line in text.splitlines(keepends=True):
            starts.append(starts[-1] + len(line))
        functions = sorted(
            (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
            key=lambda n: n.lineno,
        )
        lines = text.splitlines(keepends=True)
        for fn in functions:
            if fn.end_lineno - fn.body[0].lineno < 7:
                continue
            header_end = _header_end(lines, fn.lineno - 1, fn.body[0].lineno - 1)
            if header_end is None or starts[header_end + 1] < prompt_chars:
                continue
            body_at = starts[header_end + 1]
            begin = text.rfind("\n", 0, body_at - prompt_chars) + 1
            prompts.append({"name": f"{module}:{fn.name}", "text": text[begin:body_at]})
            break
    for name, text in FALLBACK_PROMPTS:
        if len(prompts) >= count:
            break
        prompts.append({"name": name, "text": text})
    return prompts[:count]


def _header_end(lines: list[str], first: int, body: int) -> int | None:
    """Index of the line that ends a `def` header (its colon, brackets closed), between first and body."""
    depth = 0
    for i in range(first, body + 1):
        code = lines[i].split("#", 1)[0].rstrip()
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if depth == 0 and code.endswith(":"):
            return i
    return None
