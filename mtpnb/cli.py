"""The `mtpnb` command (also `python -m mtpnb`): the notebook's jobs from a terminal.

    mtpnb generate "def fibonacci(n):" --depth 3     tokens coloured by what MTP did, legend, metrics
    mtpnb info [--model SOURCE]                       versions, device, BLAS, the model's summary
    mtpnb bench [MODEL] [--quick]                     depths against plain decoding (mtpnb.bench)
    mtpnb lab [--no-browser]                          JupyterLab on the tutorial notebooks
    mtpnb train ARGS...                               python -m mtpnb.train, arguments passed through
    mtpnb serve [MODEL] ...                           the OpenAI-compatible server (mtpnb.server)

Exit codes: 0 done, 2 bad usage or input (one line on stderr), 1 an unexpected failure (with its
traceback), 130 interrupted. Like every `import mtpnb`, it runs MLX on OpenBLAS when that is installed
(mtpnb.blas; MTPNB_NO_OPENBLAS=1 opts out).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import sys
import sysconfig
import traceback
from pathlib import Path

from . import __version__
from .errors import MTPNBError
from .events import Done, TokenEvent
from .params import GENERATION_ARGUMENTS, MODEL_ARGUMENTS, add_arguments, generation_params, model_options
from .terminal import describe_model, legend, render_prompt, render_token, use_color

class UsageFailure(Exception):
    """A bad command line: its one-line message goes to stderr, and the exit code is 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageFailure(f"{self.prog}: {message} (see {self.prog} --help)")


# -- the verbs --------------------------------------------------------------------------------------------
def run_generate(args) -> int:
    prompt = read_prompt(args.prompt)
    params = generation_params(args)
    model = open_model(args)
    for note in getattr(model, "notes", ()):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(model.generate(prompt, **params).to_dict()))
        return 0
    out = sys.stdout
    color = use_color(out, args.color)
    events = model.stream(prompt, **params)  # validates before anything is written
    if not params.get("chat"):
        out.write(render_prompt(prompt, color))
    result = None
    for event in events:
        if isinstance(event, TokenEvent):
            out.write(render_token(event.kind, event.text, color))
            out.flush()
        elif isinstance(event, Done):
            result = event.result
    if color or not result.text.endswith("\n"):
        out.write("\n")
    if color:
        out.write(legend() + "\n")
    out.flush()
    print(result.metrics.summary(), file=sys.stderr)
    return 0


def run_info(args) -> int:
    if not args.url:  # this machine's side: what a local model runs on
        import mlx.core as mx

        from .blas import blas_info

        print(f"mtpnb {__version__}, MLX {mx.__version__}, default device: {mx.default_device().type.name}")
        print(blas_info()["message"])
        sys.stdout.flush()
    print(describe_model(open_model(args).info()))
    return 0


def run_bench(args) -> int:
    from .bench import run_from_args

    return run_from_args(args, args.verb_argv)


def run_lab(args) -> int:
    folder = Path(args.dir).expanduser().resolve() if args.dir else find_notebooks()
    notebooks = sorted(folder.glob("*.ipynb"))
    if not notebooks:
        raise MTPNBError(f"no notebooks (*.ipynb) in {folder}")
    if importlib.util.find_spec("jupyterlab") is None:
        raise MTPNBError(f"JupyterLab is not installed: {LAB_EXTRA_HINT}")
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}"]
    if args.no_browser:
        command.append("--no-browser")
    if args.port is not None:
        command.append(f"--ServerApp.port={args.port}")
    if os.geteuid() == 0 and "--allow-root" not in args.jupyter_args:
        # JupyterLab refuses root without it; containers and fresh cloud machines are root
        print("mtpnb lab: running as root, so JupyterLab gets --allow-root", file=sys.stderr)
        command.append("--allow-root")
    command += [*args.jupyter_args, str(notebooks[0])]
    if args.dry_run:
        print(shlex.join(command))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)  # JupyterLab takes over this process: Ctrl-C goes straight to it


def extra_hint(extra: str, packages: str) -> str:
    """How to add one of mtpnb's extras, from a clone or to any install (neither assumes a release on PyPI)."""
    return f"pip install -e '.[{extra}]' in a clone of mtpnb, or pip install {packages}"


LAB_EXTRA_HINT = extra_hint("lab", "'jupyterlab>=4.2'")


def notebook_folders() -> list[Path]:
    """Where the tutorial notebooks may be, in order: the repository's notebooks/ (a clone or an editable
    install), then where a wheel puts them (<prefix>/share/mtpnb/notebooks, or the user scheme's)."""
    data = {sysconfig.get_path("data")}
    with contextlib.suppress(KeyError):
        data.add(sysconfig.get_path("data", f"{os.name}_user"))
    return [Path(__file__).resolve().parent.parent / "notebooks",
            *(Path(d) / "share" / "mtpnb" / "notebooks" for d in sorted(data))]


def find_notebooks() -> Path:
    """The first of `notebook_folders()` that holds notebooks."""
    for folder in notebook_folders():
        if any(folder.glob("*.ipynb")):
            return folder
    raise MTPNBError("the tutorial notebooks are not in this install (looked in "
                     f"{', '.join(map(str, notebook_folders()))}): pass --dir FOLDER, or install mtpnb from a clone")


def run_train(argv: list[str]) -> int:
    try:
        from .train.train import main as train
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("torch", "transformers"):
            raise
        raise MTPNBError(f"training needs torch and transformers ({e.name} is missing): "
                         + extra_hint("train", "torch transformers")) from None
    try:
        train(argv)
    except SystemExit as e:  # its argparse: --help (0) or a bad argument (2)
        return e.code if isinstance(e.code, int) else 1
    return 0


# -- shared pieces ----------------------------------------------------------------------------------------
def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_prompt(prompt: str | None) -> str:
    """The prompt argument, or standard input for '-' or none (when it is not a terminal)."""
    if prompt is not None and prompt != "-":
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise MTPNBError("give a prompt: mtpnb generate \"TEXT\", or pipe it in on standard input")
    stdin = getattr(sys.stdin, "buffer", None)
    try:  # UTF-8 whatever the locale says, with a one-line error for other bytes
        text = stdin.read().decode("utf-8") if stdin is not None else sys.stdin.read()
    except UnicodeDecodeError as e:
        raise MTPNBError(f"standard input is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None
    if not text.strip():
        raise MTPNBError("the prompt on standard input is empty")
    return text


def open_model(args):
    """--url: a served model (mtpnb.connect); otherwise --model (default: the embedded model), loaded
    without the loader's warnings (they are in its `notes`, which the commands print)."""
    if getattr(args, "url", None):
        from . import connect

        return connect(args.url, args.api_key)
    from .loading import load

    return load(args.model, quiet=True, **model_options(args))


def add_model_arguments(parser: argparse.ArgumentParser, *, remote: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", metavar="SOURCE",
                       help="a model folder or Hugging Face repo id (default: the embedded default model)")
    add_arguments(group, MODEL_ARGUMENTS)
    if remote:
        group.add_argument("--url", help="use the model served by `mtpnb serve` at this URL instead")
        group.add_argument("--api-key", metavar="KEY", help="the server's API key (default: $MTPNB_API_KEY)")


def build_parser() -> Parser:
    parser = Parser(prog="mtpnb", description="Multi-token-prediction speculative decoding on MLX.",
                    epilog="Exit codes: 0 done, 2 bad usage or input, 1 unexpected failure.")
    parser.add_argument("--version", action="version", version=f"mtpnb {__version__}")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = verbs.add_parser("generate", help="generate from a prompt, tokens coloured by what MTP did",
                                description="Generate from a prompt. On a terminal every token is coloured by "
                                "what multi-token prediction did with it; the metrics go to stderr.")
    generate.add_argument("prompt", nargs="?", help="the prompt (default, or '-': standard input)")
    add_arguments(generate, GENERATION_ARGUMENTS)
    add_model_arguments(generate, remote=True)
    output = generate.add_argument_group("output")
    output.add_argument("--color", action=argparse.BooleanOptionalAction,
                        help="colour the tokens (default: on a terminal, unless $NO_COLOR is set); without "
                        "colour only the output text is written")
    output.add_argument("--json", action="store_true", help="print the whole Result as JSON instead")
    generate.set_defaults(run=run_generate)

    info = verbs.add_parser("info", help="versions, device, BLAS and the model's summary",
                            description="Show mtpnb's and MLX's versions, the device, which BLAS MLX's CPU backend "
                            "uses, and the model's summary.")
    add_model_arguments(info, remote=True)
    info.set_defaults(run=run_info)

    from .bench import DESCRIPTION as BENCH_DESCRIPTION, add_bench_arguments

    bench = verbs.add_parser("bench", help="benchmark MTP depths against plain decoding", description=BENCH_DESCRIPTION)
    add_bench_arguments(bench)
    bench.set_defaults(run=run_bench)

    lab = verbs.add_parser("lab", help="open JupyterLab on the tutorial notebooks",
                           description="Open JupyterLab on the tutorial notebooks. Arguments after '--' go to "
                           "JupyterLab.")
    lab.add_argument("--dir", metavar="FOLDER", help="the notebooks' folder (default: the tutorials)")
    lab.add_argument("--port", type=int, help="the server's port (default: JupyterLab's)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser")
    lab.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    lab.add_argument("jupyter_args", nargs="*", metavar="JUPYTER_ARG", help="arguments for JupyterLab, after '--'")
    lab.set_defaults(run=run_lab)

    verbs.add_parser("train", add_help=False, help="train a model (python -m mtpnb.train; try: mtpnb train --help)")

    from .server import add_serve_arguments, run_serve

    serve = verbs.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                             description="Serve a model over an OpenAI-compatible HTTP API, with the MTP "
                             "token events in an extension field.")
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)
    parser.verbs = verbs.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = "mtpnb"
    try:
        for arg in argv:  # bytes that are not UTF-8 arrive as lone surrogates (PEP 383)
            if not _is_utf8(arg):
                raise UsageFailure(f"mtpnb: the argument {ascii(arg)} is not valid UTF-8 text")
        args, extra = parser.parse_known_args(argv)
        command = f"mtpnb {args.command}"
        args.verb_argv = argv[argv.index(args.command) + 1:]
        if args.command == "train":
            return run_train(extra)
        if extra:
            parser.verbs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        return args.run(args)
    except UsageFailure as e:
        print(e, file=sys.stderr)
        return 2
    except MTPNBError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mtpnb generate ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:
        traceback.print_exc()
        print(f"{command}: unexpected error (the traceback is above)", file=sys.stderr)
        return 1
