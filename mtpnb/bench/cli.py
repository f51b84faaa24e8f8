"""`mtpnb bench` / `python -m mtpnb.bench` / `%mtp bench`'s options: the command line of the bench, and
the BLAS comparison it can add (the same bench in two subprocesses)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import MTPNBError
from ..params import MODEL_ARGUMENTS, add_arguments, depth_list, model_options, temperature_list
from .prompts import code_prompts, heldout_modules
from .stats import json_safe
from .suite import FULL, QUICK, run_bench

DESCRIPTION = ("Benchmark MTP depths against plain decoding (depth 0) and mlx-lm on code prompts: decode and "
               "end-to-end tok/s, TTFT, acceptance, the verify-cost curve and the speedup bound; JSON + HTML.")


def compare_blas(model_arg: str | None, *, max_tokens: int = 64, repeats: int = 3, max_depth: int = 4,
                 timeout: float = 900) -> dict:
    """Depth-0 decode tok/s and the verify-cost curve of the same model with MLX's bundled BLAS and with
    OpenBLAS preloaded, each in its own subprocess (one after the other)."""
    import subprocess
    import tempfile

    from ..blas import OPT_OUT_ENV, openblas_path

    library = openblas_path()
    if not sys.platform.startswith("linux"):
        return {"skipped": "not Linux"}
    if not library:
        return {"skipped": "OpenBLAS is not installed (apt-get install libopenblas0-pthread)"}
    out = {}
    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    variants = {"bundled": {**base_env, OPT_OUT_ENV: "1"},
                "openblas": {**base_env, OPT_OUT_ENV: "1", "LD_PRELOAD": library}}
    for name, env in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            json_path = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "mtpnb.bench", *([model_arg] if model_arg else []),
                   "--depths", ",".join(str(d) for d in range(max_depth + 1)), "--temperatures", "0",
                   "--max-tokens", str(max_tokens), "--repeats", str(repeats), "--prompts", "2", "--no-peers",
                   "--no-phases", "--json", str(json_path), "--quiet"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0 or not json_path.exists():
                out[name] = {"error": (proc.stderr or proc.stdout).strip()[-500:]}
                continue
            r = json.loads(json_path.read_text())
            rows = {row["depth"]: row for row in r["results"] if row["engine"] == "mtpnb"}
            out[name] = {
                "kind": r["platform"]["blas"]["kind"],
                "library": r["platform"]["blas"]["library"],
                "gflops": r["platform"]["blas"].get("gflops"),
                "decode_tok_s": rows[0]["decode_tok_s"],
                "decode_tok_s_by_depth": {str(d): row["decode_tok_s"] for d, row in rows.items()},
                "t1_ms": r["cost_model"]["t1_ms"],
                "verify_ratio": r["cost_model"]["verify_ratio"],
                "draft_ratio": r["cost_model"]["draft_ratio"].get("greedy"),
                "command": " ".join(cmd[1:-1]),
            }
    if "decode_tok_s" in out.get("bundled", {}) and "decode_tok_s" in out.get("openblas", {}):
        out["depth0_decode_gain"] = out["openblas"]["decode_tok_s"] / out["bundled"]["decode_tok_s"]
    return out


# -- command line ------------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a model folder or Hugging Face repo id (default: the embedded default model)")
    parser.add_argument("--quick", action="store_true",
                        help="a minute or two on 2 cores: 2 prompts, 64 tokens, 1 repeat (figures indicative only)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--html", metavar="PATH", help="write the report as standalone HTML (plotly inline)")
    parser.add_argument("--depths", type=depth_list, default=[0, 1, 2, 3, 4], metavar="LIST",
                        help="depths to run, comma-separated (depth 0 always runs; default 0,1,2,3,4)")
    parser.add_argument("--temperatures", type=temperature_list, default=[0.0, 0.6], metavar="LIST",
                        help="temperatures, comma-separated (default 0,0.6)")
    parser.add_argument("--top-p", type=float, default=0.95, help="top-p when sampling (default 0.95)")
    parser.add_argument("--top-k", type=int, default=20, help="top-k when sampling (default 20)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help=f"tokens per generation (default {FULL['max_tokens']}, quick {QUICK['max_tokens']})")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help=f"measured repeats (default {FULL['repeats']}, quick {QUICK['repeats']})")
    parser.add_argument("--warmup", type=int, default=None, metavar="N", help="warm-up rounds (default 1)")
    parser.add_argument("--prompts", type=int, default=None, metavar="N",
                        help=f"number of code prompts (default {FULL['prompts']}, quick {QUICK['prompts']})")
    parser.add_argument("--prompt-file", metavar="FILE", action="append",
                        help="use the text of FILE as a prompt (repeatable) instead of the code prompts")
    parser.add_argument("--no-peers", action="store_true", help="skip mlx-lm's stream_generate")
    parser.add_argument("--no-phases", action="store_true", help="skip the per-phase profile runs")
    parser.add_argument("--compare-blas", action="store_true",
                        help="also measure depth 0 and the verify-cost curve with and without OpenBLAS (two subprocesses)")
    parser.add_argument("--compare", metavar="MODEL2",
                        help="a second model with an MTP head, alternated with MODEL in the same run on the same prompt "
                             "texts: the report adds its speedups, depth-0 tok/s and cost model beside MODEL's")
    parser.add_argument("--standin", metavar="DIR",
                        help="bench a random checkpoint shaped like the default model, written to DIR if missing "
                             "(machinery only: its speedups mean nothing)")
    add_arguments(parser, MODEL_ARGUMENTS)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_bench_arguments(argparse.ArgumentParser(prog="mtpnb bench", description=DESCRIPTION))


def read_prompt_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise MTPNBError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise MTPNBError(f"the prompt file {path} is not UTF-8 text") from None


def check_writable(path: str, flag: str) -> None:
    """Refuse an output path the report could not be written to."""
    file = Path(path).expanduser()
    folder = file.parent
    if file.is_dir():
        raise MTPNBError(f"{flag} {path} is a folder: give a file path")
    if not folder.is_dir():
        raise MTPNBError(f"{flag} {path}: there is no folder {folder}")
    if not os.access(file if file.exists() else folder, os.W_OK):
        raise MTPNBError(f"{flag} {path}: no permission to write there")


def run_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """What `mtpnb bench` does with parsed arguments; returns the exit code."""
    from ..fixtures import make_standin
    from ..loading import load

    try:  # bad paths fail now, not after the bench has run
        prompts = [{"name": Path(f).name, "text": read_prompt_file(f)} for f in args.prompt_file or ()]
        for flag, path in (("--json", args.json), ("--html", args.html)):
            if path:
                check_writable(path, flag)
    except MTPNBError as e:
        print(f"mtpnb bench: {e}", file=sys.stderr)
        return 2
    model_arg = args.model
    if args.standin:
        if args.model:
            print("mtpnb bench: give MODEL or --standin, not both", file=sys.stderr)
            return 2
        model_arg = str(make_standin(args.standin))
    try:
        model = load(model_arg, quiet=True, **model_options(args))  # a missing head is a note in the report
    except MTPNBError as e:
        print(f"mtpnb bench: {e}", file=sys.stderr)
        return 2
    other = None
    if args.compare:
        try:
            other = load(args.compare, quiet=True, **model_options(args))
        except MTPNBError as e:
            print(f"mtpnb bench: --compare: {e}", file=sys.stderr)
            return 2
    if not prompts:
        prompts = None if args.prompts is None else code_prompts(args.prompts, modules=heldout_modules(model.path))
        if prompts and len(prompts) < args.prompts:
            print(f"mtpnb bench: note: --prompts {args.prompts}: there are {len(prompts)} code prompts, and all of "
                  "them run (--prompt-file adds your own)", file=sys.stderr)
    started = time.perf_counter()

    def progress(done, total, label):
        if not args.quiet:
            print(f"[{done:>3}/{total}] {time.perf_counter() - started:6.1f}s {label}", file=sys.stderr, flush=True)

    try:
        report = run_bench(
            model, prompts=prompts, depths=args.depths, temperatures=args.temperatures, top_p=args.top_p,
            top_k=args.top_k, max_tokens=args.max_tokens, repeats=args.repeats, warmup=args.warmup,
            quick=args.quick, peers=not args.no_peers, phases=not args.no_phases, progress=progress, other=other,
        )
    except MTPNBError as e:
        print(f"mtpnb bench: {e}", file=sys.stderr)
        return 2
    if args.compare_blas:
        if not args.quiet:
            print("comparing BLAS libraries in two subprocesses...", file=sys.stderr, flush=True)
        report.data["blas_comparison"] = json_safe(compare_blas(model_arg))
    report.data["command"] = "mtpnb bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report.data["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        report.to_json(args.json)
    if args.html:
        report.to_html(args.html)
    if not args.quiet:
        print(report.summary())
        if report.data.get("blas_comparison"):
            print(json.dumps(report.data["blas_comparison"], indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv), argv)

