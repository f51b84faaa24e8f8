"""The training corpus: the Python standard library plus well-known permissively licensed pure-Python
packages from PyPI; the held-out text is whole packages that mtpnb's own install brings in.

    python -m mtpnb.train.corpus OUT [--downloads DIR] [--tokenizer DIR]
    python -m mtpnb.train.corpus OUT --subset-of CORPUS --tokens N [--seed S]

Selection (deterministic for a given interpreter and environment; everything is recorded in
`manifest.json`):
- the standard library: every `*.py` under `sysconfig.get_paths()["stdlib"]`, in sorted path order, except
  what is not the standard library (`site-packages`, `dist-packages`), byte-code caches, two generated
  packages that read as data (`encodings`, `pydoc_data`), and the test suites (`test/`, `tests/`,
  `idle_test/`) but for `test/support/` (library code); the modules HELDOUT_MODULES stay out of training
  (`mtpnb bench` draws its prompts from them);
- PACKAGES: pinned name, version and licence (MIT, BSD, Apache-2.0, PSF and alike), fetched with
  `pip download --no-deps` into `--downloads` (wheel, else sdist) and read from the archive: their
  `*.py` files except tests (`test`/`tests`/`testing` folders, `test_*.py`, `*_test.py`, `conftest.py`),
  vendored copies of other projects (`_vendor`, `vendor`, `_vendored`, `vendored`, `extern`) and files over
  MAX_FILE_BYTES (generated tables); at most MAX_PACKAGE_BYTES per package (its files in path order);
- no package of the requirement closure of `mtpnb[test]` (computed from the installed distributions'
  metadata, `mtpnb_closure`) goes into training: that is the code mtpnb's users have open next to the
  notebook, and HELDOUT_PACKAGES, whole packages of it, read from this environment, are the held-out text;
- files that are not UTF-8 or do not parse under the running interpreter are skipped;
- exact duplicates (same text after stripping trailing whitespace) and near-duplicates (MinHash over
  word 5-grams, estimated Jaccard >= NEAR_DUPLICATE) are removed: held-out files first, then the stdlib,
  then the packages in PACKAGES order; a training file that duplicates a held-out one is dropped.

`prepare()` reuses a tokenizer folder when given one (the v1 tokenizer: the held-out perplexity of old and
new models is then per the same tokens), else trains a byte-level BPE on the training files; it packs both
splits into uint16 token arrays, each file followed by `<|endoftext|>`.

`subset()` writes a fine-tune's share of a corpus: whole training files drawn at random (the lent GPU takes
at most 64 MiB of files per run, and the whole training split is about twice that).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as metadata
import io
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"})
TEST_DIRS = frozenset({"test", "tests", "testing", "idle_test"})
VENDOR_DIRS = frozenset({"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern"})
MAX_FILE_BYTES = 400_000
MAX_PACKAGE_BYTES = 12_000_000
NEAR_DUPLICATE = 0.8
# Pure-Python stdlib modules present in every CPython from 3.10 on, kept out of training: the prompts of
# `mtpnb bench` come from them.
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
# Held-out packages: installed with mtpnb[test], ordinary library code, together ~4 MB.
HELDOUT_PACKAGES = (
    "requests",
    "click",
    "attrs",
    "httpx",
    "h11",
    "packaging",
    "jinja2",
    "anyio",
    "pluggy",
    "typer",
    "urllib3",
    "markdown-it-py",
    "platformdirs",
    "jsonschema",
)
# name, version, licence (read from the distribution's metadata when pinned)
PACKAGES = (
    ("django", "5.2.19", "BSD-3-Clause"),
    ("sympy", "1.14.0", "BSD-3-Clause"),
    ("networkx", "3.6.1", "BSD-3-Clause"),
    ("sphinx", "9.0.4", "BSD-2-Clause"),
    ("docutils", "0.23", "BSD-2-Clause / public domain"),
    ("flask", "3.1.3", "BSD-3-Clause"),
    ("werkzeug", "3.1.9", "BSD-3-Clause"),
    ("twisted", "26.10.0", "MIT"),
    ("scrapy", "2.19.0", "BSD-3-Clause"),
    ("celery", "5.7.0", "BSD-3-Clause"),
    ("kombu", "5.7.0", "BSD-3-Clause"),
    ("jax", "0.10.2", "Apache-2.0"),
    ("flax", "0.12.8", "Apache-2.0"),
    ("optax", "0.2.8", "Apache-2.0"),
    ("keras", "3.15.1", "Apache-2.0"),
    ("dask", "2026.8.0", "BSD-3-Clause"),
    ("distributed", "2026.8.0", "BSD-3-Clause"),
    ("bokeh", "3.9.2", "BSD-3-Clause"),
    ("nltk", "3.10.4", "Apache-2.0"),
    ("alembic", "1.20.1", "MIT"),
    ("sqlalchemy", "2.1.9", "MIT"),
    ("fastapi", "0.165.0", "MIT"),
    ("starlette", "1.10.0", "BSD-3-Clause"),
    ("marshmallow", "4.4.0", "MIT"),
    ("openpyxl", "3.1.5", "MIT"),
    ("xlsxwriter", "3.3.1", "BSD-2-Clause"),
    ("pyglet", "2.1.19", "BSD-3-Clause"),
    ("sqlglot", "30.31.0", "MIT"),
    ("moto", "5.2.5", "Apache-2.0"),
    ("setuptools", "84.2.1", "MIT"),
    ("pyparsing", "3.3.3", "MIT"),
    ("textual", "8.2.8", "MIT"),
    ("tox", "4.67.15", "MIT"),
    ("virtualenv", "21.15.11", "MIT"),
    ("hatchling", "1.33.0", "MIT"),
    ("poetry-core", "2.5.0", "MIT"),
    ("pyqtgraph", "0.14.0", "MIT"),
    ("music21", "10.5.1", "BSD-3-Clause"),
    ("sqlparse", "0.6.1", "BSD-3-Clause"),
    ("simpy", "4.1.2", "MIT"),
    ("xarray", "2026.9.0", "Apache-2.0"),
    ("isort", "9.0.2", "MIT"),
    ("pyflakes", "4.1.0", "MIT"),
    ("pycodestyle", "2.15.0", "MIT"),
    ("flake8", "7.5.0", "MIT"),
    ("yapf", "0.43.0", "Apache-2.0"),
    ("pyasn1", "0.6.5", "BSD-2-Clause"),
    ("rsa", "4.9.1", "Apache-2.0"),
    ("oauthlib", "4.0.1", "BSD-3-Clause"),
    ("google-auth", "2.63.0", "Apache-2.0"),
    ("boltons", "26.2.0", "BSD-3-Clause"),
    ("toolz", "1.2.0", "BSD-3-Clause"),
    ("more-itertools", "11.2.1", "MIT"),
    ("cattrs", "26.2.1", "MIT"),
    ("humanize", "4.17.0", "MIT"),
    ("tabulate", "0.10.0", "MIT"),
    ("invoke", "3.0.3", "BSD-2-Clause"),
    ("fabric", "3.2.3", "BSD-2-Clause"),
    ("gunicorn", "27.0.1", "MIT"),
    ("uvicorn", "0.54.0", "BSD-3-Clause"),
    ("bottle", "0.13.4", "MIT"),
    ("cherrypy", "18.10.0", "BSD-3-Clause"),
    ("sanic", "25.12.1", "MIT"),
    ("graphql-core", "3.3.2", "MIT"),
    ("graphene", "3.4.3", "MIT"),
    ("peewee", "4.5.3", "MIT"),
    ("redis", "8.1.0", "MIT"),
    ("elasticsearch", "9.5.1", "Apache-2.0"),
    ("pika", "1.4.4", "BSD-3-Clause"),
    ("pyserial", "3.5", "BSD-3-Clause"),
    ("imageio", "2.38.2", "BSD-2-Clause"),
    ("patsy", "1.0.3", "BSD-2-Clause"),
    ("lifelines", "0.30.3", "MIT"),
    ("optuna", "5.0.0", "MIT"),
    ("luigi", "3.8.1", "Apache-2.0"),
    ("mkdocs", "1.6.1", "BSD-2-Clause"),
    ("markdown", "3.11.3", "BSD-3-Clause"),
    ("mock", "5.2.0", "BSD-2-Clause"),
    ("freezegun", "1.5.5", "Apache-2.0"),
    ("responses", "0.26.3", "Apache-2.0"),
    ("vcrpy", "9.4.2", "MIT"),
    ("factory-boy", "3.3.3", "MIT"),
    ("djangorestframework", "3.18.3", "BSD-3-Clause"),
    ("django-extensions", "4.1", "MIT"),
    ("sentry-sdk", "2.75.0", "MIT"),
    ("structlog", "26.1.0", "MIT OR Apache-2.0"),
    ("loguru", "0.7.3", "MIT"),
    ("colorama", "0.4.6", "BSD-3-Clause"),
    ("blessed", "1.52.0", "MIT"),
    ("asciimatics", "1.15.0", "Apache-2.0"),
    ("trimesh", "5.2.0", "MIT"),
    ("geopandas", "1.2.0", "BSD-3-Clause"),
    ("seaborn", "0.13.2", "BSD-3-Clause"),
    ("plotnine", "0.15.9", "MIT"),
    ("mpmath", "1.4.1", "BSD-3-Clause"),
    ("pint", "0.25.3", "BSD-3-Clause"),
    ("skyfield", "1.55", "MIT"),
    ("pvlib", "0.16.1", "BSD-3-Clause"),
    ("mesa", "3.3.1", "Apache-2.0"),
    ("gymnasium", "1.4.0", "MIT"),
    ("stable-baselines3", "2.9.2", "MIT"),
    ("datasets", "5.2.0", "Apache-2.0"),
    ("diffusers", "0.42.1", "Apache-2.0"),
    ("accelerate", "1.15.0", "Apache-2.0"),
    ("peft", "0.21.2", "Apache-2.0"),
    ("trl", "1.16.0", "Apache-2.0"),
    ("timm", "1.0.31", "Apache-2.0"),
    ("lightning", "2.6.6", "Apache-2.0"),
    ("torchmetrics", "1.9.0", "Apache-2.0"),
    ("einops", "0.8.2", "MIT"),
    ("opt-einsum", "3.4.0", "MIT"),
    ("equinox", "0.13.8", "Apache-2.0"),
    ("chex", "0.1.92", "Apache-2.0"),
    ("dm-haiku", "0.0.17", "Apache-2.0"),
    ("tensorflow-probability", "0.25.0", "Apache-2.0"),
    ("pyro-ppl", "1.9.2", "Apache-2.0"),
    ("numpyro", "0.22.0", "Apache-2.0"),
    ("botorch", "0.18.1", "MIT"),
    ("gpytorch", "1.15.2", "MIT"),
    ("ax-platform", "1.3.1", "MIT"),
    ("wagtail", "8.0.1", "BSD-3-Clause"),
    ("pyramid", "2.1", "BSD-derived (Repoze)"),
    ("webob", "1.8.11", "MIT"),
    ("falcon", "4.4.0", "Apache-2.0"),
    ("homeassistant", "2024.3.3", "Apache-2.0"),
)


@dataclass
class SourceFile:
    path: str  # stdlib: relative to the stdlib folder; package: "<package>/<path in the archive>"
    sha256: str
    bytes: int
    text: str = field(repr=False, default="")


@dataclass
class Source:
    """One unit of the manifest: the stdlib, or a package."""

    name: str
    version: str
    licence: str
    origin: str  # archive file name or folder
    sha256: str  # of the archive (packages from PyPI); of the sorted file hashes otherwise
    files: list[SourceFile]
    skipped: dict[str, int] = field(default_factory=dict)


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def _decode(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if _parses(text) else None


def _count(skipped: dict[str, int], why: str) -> None:
    skipped[why] = skipped.get(why, 0) + 1


def _is_stdlib_heldout(parts: tuple[str, ...]) -> bool:
    return parts[0].removesuffix(".py") in HELDOUT_MODULES


def stdlib_source(root: Path = STDLIB) -> tuple[Source, list[SourceFile]]:
    """(the stdlib's training files, its held-out module files)."""
    train, heldout, skipped = [], [], {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if EXCLUDED_DIRS.intersection(dirs):
            continue
        if TEST_DIRS.intersection(dirs) and rel.parts[:2] != ("test", "support"):
            _count(skipped, "tests")
            continue
        text = _decode(path.read_bytes())
        if text is None:
            _count(skipped, "not UTF-8 or does not parse")
            continue
        f = SourceFile(rel.as_posix(), hashlib.sha256(text.encode()).hexdigest(), len(text.encode()), text)
        (heldout if _is_stdlib_heldout(rel.parts) else train).append(f)
    digest = hashlib.sha256("".join(f.sha256 for f in train).encode()).hexdigest()
    return Source("stdlib", platform.python_version(), "PSF-2.0", str(root), digest, train, skipped), heldout


def _keep_package_path(path: str, skipped: dict[str, int]) -> bool:
    p = PurePosixPath(path)
    if p.suffix != ".py":
        return False
    dirs = set(p.parts[:-1])
    if dirs & TEST_DIRS or p.name.startswith("test_") or p.name.endswith("_test.py") or p.name == "conftest.py":
        _count(skipped, "tests")
        return False
    if dirs & VENDOR_DIRS:
        _count(skipped, "vendored")
        return False
    return True


def _archive_members(archive: Path) -> list[tuple[str, bytes]]:
    """(path, bytes) of the Python files of a wheel or an sdist, in sorted path order."""
    members = []
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.endswith(".py"):
                    members.append((name, z.read(name)))
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(".py"):
                    # an sdist's top folder is name-version/: drop it
                    members.append((m.name.split("/", 1)[-1], t.extractfile(m).read()))
    return sorted(members)


def download(downloads: Path, packages=PACKAGES) -> dict[str, Path]:
    """pip download --no-deps each pinned package (once) into `downloads`; {name: archive}."""
    downloads.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, version, _ in packages:
        archive = _find_archive(downloads, name, version)
        if archive is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), f"{name}=={version}"],
                check=True,
            )
            archive = _find_archive(downloads, name, version)
            if archive is None:
                raise FileNotFoundError(f"pip download {name}=={version} left no archive in {downloads}")
        found[name] = archive
    return found


def _find_archive(downloads: Path, name: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(downloads.iterdir()):
        base = re.sub(r"[-_.]+", "_", path.name).lower()
        if base.startswith(f"{stem}_{version.replace('.', '_')}_") or base.startswith(f"{stem}_{version.replace('.', '_')}."):
            return path
    return None


def package_source(name: str, version: str, licence: str, archive: Path) -> Source:
    files, skipped, size = [], {}, 0
    for path, data in _archive_members(archive):
        if not _keep_package_path(path, skipped):
            continue
        if len(data) > MAX_FILE_BYTES:
            _count(skipped, "over MAX_FILE_BYTES")
            continue
        if size + len(data) > MAX_PACKAGE_BYTES:
            _count(skipped, "over MAX_PACKAGE_BYTES")
            continue
        text = _decode(data)
        if text is None:
            _count(skipped, "not UTF-8 or does not parse")
            continue
        files.append(SourceFile(f"{name}/{path}", hashlib.sha256(data).hexdigest(), len(data), text))
        size += len(data)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    return Source(name, version, licence, archive.name, digest, files, skipped)


def installed_source(name: str) -> Source:
    """A held-out package's Python files, read from this environment."""
    dist = metadata.distribution(name)
    meta = dist.metadata
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    licence = meta.get("License-Expression") or (meta.get("License") or "").split("\n")[0] or ", ".join(classifiers)
    files, skipped = [], {}
    for entry in sorted(dist.files or [], key=str):
        path = str(entry)
        if path.startswith("..") or ".dist-info/" in path or not _keep_package_path(path, skipped):
            continue
        text = _decode(Path(dist.locate_file(entry)).read_bytes())
        if text is None:
            _count(skipped, "not UTF-8 or does not parse")
            continue
        files.append(SourceFile(f"{name}/{path}", hashlib.sha256(text.encode()).hexdigest(), len(text.encode()), text))
    digest = hashlib.sha256("".join(f.sha256 for f in files).encode()).hexdigest()
    return Source(name, dist.version, licence, "installed", digest, files, skipped)


def mtpnb_closure(root: str = "mtpnb", extras: frozenset[str] = frozenset({"test"})) -> list[str]:
    """Canonical names of `root[extras]` and every distribution it requires, transitively (markers
    evaluated for this interpreter and the extras asked for), from the installed metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, frozenset[str]] = {}
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen and wanted <= seen[key]:
            continue
        seen[key] = seen.get(key, frozenset()) | wanted
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            environments = [{"extra": e} for e in (wanted or {""})]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    return sorted(seen)


# -- duplicates ---------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")
_PERMUTATIONS = 32
_BANDS = 8  # of _PERMUTATIONS // _BANDS rows each
_RNG = np.random.default_rng(0)
_A = _RNG.integers(1, 2**63, _PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
_B = _RNG.integers(0, 2**63, _PERMUTATIONS, dtype=np.uint64)


def _normalised(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def minhash(text: str, shingle: int = 5) -> np.ndarray | None:
    """MinHash signature of the word 5-grams of `text` (None for files of fewer than 5 words)."""
    words = np.array([zlib.crc32(w.encode()) for w in _WORD.findall(text)], dtype=np.uint64)
    if len(words) < shingle:
        return None
    h = np.zeros(len(words) - shingle + 1, dtype=np.uint64)
    for i in range(shingle):
        h = h * np.uint64(1_000_003) + words[i : len(words) - shingle + 1 + i]
    h = np.unique(h)
    with np.errstate(over="ignore"):
        return (np.outer(_A, h) + _B[:, None]).min(axis=1)


class Deduplicator:
    """Remembers the files seen; `seen(text)` says whether a file repeats one of them."""

    def __init__(self):
        self.exact: set[str] = set()
        self.bands: list[dict[bytes, int]] = [{} for _ in range(_BANDS)]
        self.signatures: list[np.ndarray] = []

    def seen(self, text: str) -> str | None:
        """"exact", "near" or None (then the file is remembered)."""
        key = hashlib.sha256(_normalised(text).encode()).hexdigest()
        if key in self.exact:
            return "exact"
        self.exact.add(key)
        sig = minhash(text)
        if sig is None:
            return None
        rows = _PERMUTATIONS // _BANDS
        band_keys = [sig[b * rows : (b + 1) * rows].tobytes() for b in range(_BANDS)]
        for b, k in enumerate(band_keys):
            other = self.bands[b].get(k)
            if other is not None and np.mean(self.signatures[other] == sig) >= NEAR_DUPLICATE:
                return "near"
        index = len(self.signatures)
        self.signatures.append(sig)
        for b, k in enumerate(band_keys):
            self.bands[b].setdefault(k, index)
        return None


def deduplicate(sources: list[Source], dedup: Deduplicator) -> None:
    for source in sources:
        kept = []
        for f in source.files:
            why = dedup.seen(f.text)
            if why is None:
                kept.append(f)
            else:
                _count(source.skipped, f"{why} duplicate")
        source.files = kept


# -- the corpus ----------------------------------------------------------------------------------------
def _cap(sources: list[Source], max_bytes: int | None) -> None:
    """Keep the leading files that fit in max_bytes (the smoke run's toy corpus)."""
    if max_bytes is None:
        return
    size = 0
    for source in sources:
        kept = []
        for f in source.files:
            if size + f.bytes <= max_bytes:
                kept.append(f)
                size += f.bytes
        source.files = kept


def select(
    downloads: Path | None, packages=PACKAGES, max_train_bytes: int | None = None, max_heldout_bytes: int | None = None
) -> tuple[list[Source], list[Source], list[str], list[str]]:
    """(training sources, held-out sources, the mtpnb[test] closure, packages left out for being in it).

    `max_*_bytes` cap a split at its leading files that fit (the smoke run's toy corpus)."""
    closure = mtpnb_closure()
    stdlib, stdlib_heldout = stdlib_source()
    heldout = [Source("stdlib (bench modules)", platform.python_version(), "PSF-2.0", str(STDLIB),
                      hashlib.sha256("".join(f.sha256 for f in stdlib_heldout).encode()).hexdigest(), stdlib_heldout)]
    heldout += [installed_source(name) for name in HELDOUT_PACKAGES]
    from packaging.utils import canonicalize_name

    in_closure = [name for name, _, _ in packages if canonicalize_name(name) in closure]
    usable = [p for p in packages if p[0] not in in_closure]
    train = [stdlib]
    if downloads is not None:
        archives = download(downloads, usable)
        train += [package_source(name, version, licence, archives[name]) for name, version, licence in usable]
    _cap(train, max_train_bytes)
    _cap(heldout, max_heldout_bytes)
    dedup = Deduplicator()
    deduplicate(heldout, dedup)
    deduplicate(train, dedup)
    return train, heldout, closure, in_closure


def _pack(tokenizer, texts: list[str]) -> np.ndarray:
    eos = tokenizer.token_to_id(EOS_TOKEN)
    parts = []
    for start in range(0, len(texts), 2000):
        encoded = tokenizer.encode_batch(texts[start : start + 2000], add_special_tokens=False)
        parts.append(np.concatenate([np.asarray(e.ids + [eos], dtype=np.uint16) for e in encoded]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _summary(source: Source, tokens: int) -> dict:
    return {
        "name": source.name,
        "version": source.version,
        "licence": source.licence,
        "origin": source.origin,
        "sha256": source.sha256,
        "files": len(source.files),
        "bytes": sum(f.bytes for f in source.files),
        "tokens": tokens,
        "skipped": source.skipped,
    }


def prepare(
    out_dir: Path,
    downloads: Path | None = None,
    tokenizer_dir: Path | None = None,
    vocab_size: int = 8192,
    model_max_length: int = 4096,
    max_train_bytes: int | None = None,
    max_heldout_bytes: int | None = None,
) -> dict:
    """Select the corpus, write the tokenizer files, train.npy, heldout.npy and manifest.json.

    downloads=None: the standard library alone (tests, offline); `max_*_bytes` as in `select`.
    Returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout, closure, in_closure = select(downloads, PACKAGES, max_train_bytes, max_heldout_bytes)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
        tokenizer = load_tokenizer(out_dir)
    else:
        tokenizer = train_tokenizer((f.text for s in train for f in s.files), vocab_size)
        save_tokenizer(tokenizer, out_dir, model_max_length)
    train_arrays = [_pack(tokenizer, [f.text for f in s.files]) for s in train]
    heldout_arrays = [_pack(tokenizer, [f.text for f in s.files]) for s in heldout]
    train_ids, heldout_ids = np.concatenate(train_arrays), np.concatenate(heldout_arrays)
    np.save(out_dir / "train.npy", train_ids)
    np.save(out_dir / "heldout.npy", heldout_ids)
    manifest = {
        "python": platform.python_version(),
        "stdlib": str(STDLIB),
        "rules": {
            "stdlib": "*.py under the stdlib folder, sorted; not " + ", ".join(sorted(EXCLUDED_DIRS))
            + "; no tests (" + ", ".join(sorted(TEST_DIRS)) + ") but test/support",
            "packages": "*.py of the pinned archive (pip download --no-deps), sorted; no tests, no vendored "
            f"code ({', '.join(sorted(VENDOR_DIRS))}), no file over {MAX_FILE_BYTES} bytes, at most "
            f"{MAX_PACKAGE_BYTES} bytes per package",
            "excluded_files": "not UTF-8, or ast.parse fails under this interpreter",
            "duplicates": "exact (same text after stripping trailing whitespace) and near (MinHash, 32 "
            f"permutations over word 5-grams, estimated Jaccard >= {NEAR_DUPLICATE}); held-out first",
            "never_trained_on": "the requirement closure of mtpnb[test] (installed metadata)",
            "heldout": "whole packages of that closure (HELDOUT_PACKAGES, read from the environment) and "
            "the stdlib modules HELDOUT_MODULES",
            "separator": EOS_TOKEN + " after every file",
        },
        "heldout_modules": list(HELDOUT_MODULES),
        "heldout_packages": list(HELDOUT_PACKAGES),
        "mtpnb_test_closure": closure,
        "left_out_in_closure": in_closure,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": tokenizer.get_vocab_size(),
            "source": "reused" if tokenizer_dir is not None else "trained on the training files",
        },
        "totals": {
            "train_files": sum(len(s.files) for s in train),
            "train_bytes": sum(f.bytes for s in train for f in s.files),
            "train_tokens": int(train_ids.size),
            "heldout_files": sum(len(s.files) for s in heldout),
            "heldout_bytes": sum(f.bytes for s in heldout for f in s.files),
            "heldout_tokens": int(heldout_ids.size),
        },
        "train_sources": [_summary(s, int(a.size)) for s, a in zip(train, train_arrays)],
        "heldout_sources": [_summary(s, int(a.size)) for s, a in zip(heldout, heldout_arrays)],
        "heldout": [{k: v for k, v in asdict(f).items() if k != "text"} for s in heldout for f in s.files],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def subset(corpus_dir: Path, out_dir: Path, tokens: int, seed: int) -> dict:
    """Copy `corpus_dir` to `out_dir` with a train.npy of whole training files drawn in a seeded random
    order until the next would pass `tokens`, kept in corpus order; held-out split, tokenizer files and
    manifest as they are, the manifest recording the subset. Returns that record. A file is what ends with
    `<|endoftext|>` (the few whose text holds that marker count twice)."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = np.load(corpus_dir / "train.npy")
    ends = np.flatnonzero(train == load_tokenizer(corpus_dir).token_to_id(EOS_TOKEN)) + 1
    starts = np.concatenate([[0], ends[:-1]])
    order = np.random.default_rng(seed).permutation(len(starts))
    taken = np.sort(order[: np.searchsorted(np.cumsum((ends - starts)[order]), tokens, side="right")])
    ids = np.concatenate([train[starts[i] : ends[i]] for i in taken])
    np.save(out_dir / "train.npy", ids)
    for name in ("heldout.npy", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(corpus_dir / name, out_dir / name)
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    manifest["subset"] = {"seed": seed, "files": int(len(taken)), "of_files": int(len(starts)),
                          "tokens": int(ids.size), "of_tokens": int(train.size)}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest["subset"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mtpnb.train.corpus",
        description="Build the corpus: tokenizer files, train.npy, heldout.npy, manifest.json.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--downloads", type=Path, help="folder for the package archives (omit: the stdlib alone)")
    parser.add_argument("--tokenizer", type=Path, help="reuse the tokenizer of this folder instead of training one")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--subset-of", type=Path, metavar="CORPUS",
                        help="instead: copy this corpus with --tokens of its training files, drawn at random")
    parser.add_argument("--tokens", type=int, help="with --subset-of: at most this many training tokens")
    parser.add_argument("--seed", type=int, default=0, help="with --subset-of: which files are drawn")
    args = parser.parse_args(argv)
    if args.subset_of is not None:
        if args.tokens is None:
            parser.error("--subset-of needs --tokens N (how many training tokens to keep)")
        print(json.dumps(subset(args.subset_of, args.out_dir, args.tokens, args.seed)))
        return
    manifest = prepare(args.out_dir, args.downloads, args.tokenizer, args.vocab_size)
    print(json.dumps(manifest["totals"]))
    for s in manifest["train_sources"] + manifest["heldout_sources"]:
        print(f"{s['name']:28s} {s['version']:12s} {s['files']:6d} files {s['tokens'] / 1e6:7.2f}M tokens {s['skipped']}")


if __name__ == "__main__":
    main()
