"""IPython magics: `%load_ext mtpnb`, then

    %mtp load [SOURCE] [--quantize 4|8]     a model folder, a hub repo, or the embedded default
    %%mtp --depth 3 --max-tokens 64 -o r    the cell's text is the prompt: tokens stream into the view
    %mtp compare                            the same prompt at depth 0 and depth D, side by side
    %mtp bench --quick -o report            depths against plain decoding on the loaded model
    %mtp config --temperature 0.7           defaults for the cells that follow (bare: show them)
    %mtp info | %mtp unload | %mtp connect URL

`%mtp?` shows every command's flags. Errors are UsageErrors: IPython shows them as one line, without
a traceback, and "Run all" stops at them.
"""

from __future__ import annotations

import argparse
import gc

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .errors import MTPNBError
from .params import (GENERATION_ARGUMENTS, MODEL_ARGUMENTS, GenerationParams, depth_list, generation_params,
                     model_options, temperature_list)
from .terminal import describe_model


def _python_name(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"not a Python name: {text!r}")
    return text


OUTPUT = argument("-o", "--output", metavar="NAME", type=_python_name,
                  help="also bind the result to NAME in the notebook's namespace")
VIEW_ARGUMENTS = (
    (("--stream",), {"action": argparse.BooleanOptionalAction,
                     "help": "stream into the token view (default); --no-stream prints the text and the metrics"}),
    (("--charts",), {"action": argparse.BooleanOptionalAction, "help": "live charts under the tokens (default: off)"}),
)
VIEW_DEFAULTS = {"stream": True, "charts": False}
OVERVIEW = """\
mtpnb in a notebook: multi-token-prediction speculative decoding on MLX.

    %mtp load [SOURCE]      load a model (default: the embedded default model)
    %%mtp [flags]           generate from the cell's text, tokens streamed and coloured
    %mtp compare [PROMPT]   the same prompt at depth 0 and depth D, with the speedup
    %mtp bench [flags]      depths against plain decoding: a table and charts
    %mtp config [flags]     defaults for later cells; bare: show them
    %mtp info               the loaded model
    %mtp unload             forget it and free its memory
    %mtp connect URL        use a model served by `mtpnb serve` instead
"""


def _with(specs):
    """Decorate a magic with magic_arguments' `argument`s from (flags, options) pairs, in order."""
    def decorate(func):
        for flags, options in reversed(specs):
            func = argument(*flags, **options)(func)
        return func

    return decorate


@magics_class
class MTPMagics(Magics):
    """The %mtp / %%mtp magics, with the loaded model, the %mtp config defaults and the last prompt."""

    def __init__(self, shell):
        super().__init__(shell)
        self.model = None
        self.defaults: dict = {}  # what %mtp config set: generation parameters, "stream", "charts"
        self.last_prompt: str | None = None
        self.commands = {"load": self.load, "compare": self.compare, "bench": self.bench, "config": self.configure,
                         "info": self.info, "unload": self.unload, "connect": self.connect}

    @line_cell_magic
    def mtp(self, line, cell=None):
        command, _, rest = line.strip().partition(" ")
        if cell is not None:
            name = "%%mtp compare" if command == "compare" else "%%mtp"
        else:
            name = f"%mtp {command}" if command in self.commands else "%mtp"
        try:
            if cell is not None:
                if command == "compare":
                    return self.compare(rest, cell)
                if command in self.commands:
                    raise UsageError(f"{command} is a line magic: %mtp {command} (one %)")
                return self.generate(line, cell)
            if not command:
                print(OVERVIEW + f"\nLoaded: {self.model.name if self.model else 'nothing'}. Flags: %mtp?")
                return None
            if command not in self.commands:
                hint = " (to generate, write %%mtp on the cell's first line)" if command.startswith("-") else ""
                raise UsageError(f"unknown command {command!r}: use one of {', '.join(self.commands)}{hint}")
            return self.commands[command](rest)
        except (UsageError, MTPNBError) as e:
            raise UsageError(f"{name}: {e}") from None

    # -- the commands ---------------------------------------------------------------------------------------
    @magic_arguments("mtp load")
    @argument("source", nargs="?", help="a model folder or Hugging Face repo id (default: the embedded default model)")
    @_with(MODEL_ARGUMENTS)
    @OUTPUT
    def load(self, rest):
        """Load a model and its MTP head, and print its summary."""
        args = parse_argstring(self.load, rest)
        from .loading import load

        model = load(args.source, quiet=True, **model_options(args))  # the loader's notes are in the summary
        self.model = model
        print(describe_model(model.info()))
        self._bind(args.output, model)

    @magic_arguments("mtp connect")
    @argument("url", help="the server's address, e.g. http://127.0.0.1:8000")
    @argument("--api-key", metavar="KEY", help="the server's API key (default: $MTPNB_API_KEY)")
    @OUTPUT
    def connect(self, rest):
        """Use a model served by `mtpnb serve` in place of a loaded one."""
        args = parse_argstring(self.connect, rest)
        from . import connect

        self.model = connect(args.url, args.api_key)
        print(describe_model(self.model.info()))
        self._bind(args.output, self.model)

    @magic_arguments("%mtp")
    @_with(GENERATION_ARGUMENTS + VIEW_ARGUMENTS)
    @OUTPUT
    def generate(self, line, cell):
        """Generate from the cell's text (the prompt, exactly as typed) with the loaded model. Flags
        not given take their %mtp config defaults."""
        args = parse_argstring(self.generate, line)
        model = self._require_model()
        prompt = self._prompt(cell)
        params = self._params(args)
        if self._view(args, "stream"):
            from .widgets import show_generation

            result = show_generation(model, prompt, charts=self._view(args, "charts"), **params)
            if result is None:
                raise UsageError("the generation failed before its first token: the error is shown above")
        else:
            result = model.generate(prompt, **params)
            print(result.text)
            print(result.metrics.summary())
        self.last_prompt = prompt
        self._bind(args.output, result)

    @magic_arguments("mtp compare")
    @argument("prompt", nargs="*", help="the prompt (default: the cell's text, or else the last prompt generated from)")
    @_with(GENERATION_ARGUMENTS)
    @OUTPUT
    def compare(self, rest, cell=None):
        """Run the same prompt at depth 0 and at depth D (--depth) one after the other, side by side,
        with the speedup. -o binds the pair (depth-0 Result, depth-D Result)."""
        args = parse_argstring(self.compare, rest)
        model = self._require_model()
        prompt = self._prompt(cell) if cell is not None else " ".join(args.prompt) or self.last_prompt
        if not prompt:
            raise UsageError("no prompt: give one after the command, write it in a %%mtp compare cell, "
                             "or run a %%mtp cell first")
        params = self._params(args)
        depth = params.pop("depth", GenerationParams.depth)
        from .widgets import show_comparison

        results = show_comparison(model, prompt, depth=depth, **params)
        self.last_prompt = prompt
        if results is None:
            print("The comparison did not finish: no result" + (f" bound to {args.output}" if args.output else ""))
            return None
        self._bind(args.output, results)

    @magic_arguments("mtp bench")
    @argument("--depths", type=depth_list, metavar="LIST",
              help="depths, comma-separated; depth 0 always runs (default: mtpnb bench's)")
    @argument("--temperatures", "--temperature", type=temperature_list, metavar="LIST",
              help="temperatures, comma-separated (default: mtpnb bench's)")
    @argument("--repeats", type=int, metavar="N", help="measured repeats of every configuration")
    @argument("--max-tokens", type=int, metavar="N", help="tokens per generation")
    @argument("--prompts", type=int, metavar="N", help="how many code prompts (default: mtpnb bench's)")
    @argument("--quick", action="store_true", help="2 prompts, 64 tokens, 1 repeat: indicative figures in a minute")
    @argument("--no-peers", action="store_true", help="skip mlx-lm's plain decoding")
    @argument("--no-phases", action="store_true", help="skip the per-phase profile")
    @argument("--html", metavar="PATH", help="also write the standalone HTML report")
    @argument("--compare", metavar="MODEL", help="a second model (folder or hub repo) with an MTP head, its depths "
              "alternated with the loaded model's in the same run")
    @OUTPUT
    def bench(self, rest):
        """Benchmark the loaded model: plain decoding (depth 0, and mlx-lm) against the MTP depths,
        alternated in one run (mtpnb.bench, as `mtpnb bench`), with --compare a second model's depths in
        the same schedule; print the table, show the charts. -o binds the BenchReport."""
        args = parse_argstring(self.bench, rest)
        model = self._require_model()
        if getattr(model, "remote", False):
            raise UsageError("a benchmark times the engine in this process: %mtp load a model")
        import ipywidgets as widgets
        from IPython.display import display

        from . import bench

        prompts = None
        if args.prompts is not None:
            prompts = bench.code_prompts(args.prompts, modules=bench.heldout_modules(model.path))
        options = {"depths": args.depths, "temperatures": args.temperatures, "repeats": args.repeats}
        if args.compare:
            from .loading import load

            options["other"] = load(args.compare, quiet=True)
        bar, label = widgets.IntProgress(description="mtp bench"), widgets.Label()
        progress = widgets.HBox([bar, label])
        display(progress)

        def advance(done, total, text):
            bar.max, bar.value, label.value = total, done, text

        try:
            report = bench.run_bench(model, prompts=prompts, max_tokens=args.max_tokens, quick=args.quick,
                                     peers=not args.no_peers, phases=not args.no_phases, progress=advance,
                                     **{k: v for k, v in options.items() if v is not None})
        finally:
            progress.close()
        print(report.summary())
        for figure in report.figures():
            display(figure)
        if args.html:
            report.to_html(args.html)
        self._bind(args.output, report)

    @magic_arguments("mtp config")
    @_with(GENERATION_ARGUMENTS + VIEW_ARGUMENTS)
    @argument("--reset", action="store_true", help="forget the defaults set here (before setting new ones)")
    def configure(self, rest):
        """Set defaults for the %%mtp and %mtp compare cells that follow; show them all."""
        args = parse_argstring(self.configure, rest)
        config = {} if args.reset else dict(self.defaults)
        config.update(generation_params(args))
        config.update({k: getattr(args, k) for k in VIEW_DEFAULTS if getattr(args, k) is not None})
        GenerationParams(**{k: v for k, v in config.items() if k in GenerationParams.names()})  # MTPNBError if bad
        self.defaults = config
        print(self._describe_config())

    @magic_arguments("mtp info")
    def info(self, rest):
        """The loaded model's summary."""
        parse_argstring(self.info, rest)
        print(describe_model(self._require_model().info()))

    @magic_arguments("mtp unload")
    def unload(self, rest):
        """Forget the loaded model and give its memory back."""
        parse_argstring(self.unload, rest)
        if self.model is None:
            print("No model loaded.")
            return
        name, self.model = self.model.name, None
        release_memory()
        print(f"Unloaded {name}.")

    # -- helpers -----------------------------------------------------------------------------------------
    def _require_model(self):
        if self.model is None:
            raise UsageError("no model loaded: run %mtp load [SOURCE] (or %mtp connect URL) first")
        return self.model

    @staticmethod
    def _prompt(cell: str) -> str:
        prompt = cell.removesuffix("\n")  # IPython ends every cell body with a newline of its own
        if not prompt.strip():
            raise UsageError("the cell is empty: write the prompt below the %%mtp line")
        return prompt

    def _params(self, args) -> dict:
        return {**{k: v for k, v in self.defaults.items() if k in GenerationParams.names()}, **generation_params(args)}

    def _view(self, args, name: str) -> bool:
        value = getattr(args, name)
        return self.defaults.get(name, VIEW_DEFAULTS[name]) if value is None else value

    def _bind(self, name: str | None, value) -> None:
        """-o NAME: bind `value` in the user's namespace. Nothing is returned: a returned value would be
        echoed as a long repr under the widget that already shows it."""
        if name is not None:
            self.shell.user_ns[name] = value

    def _describe_config(self) -> str:
        defaults = {**{k: getattr(GenerationParams, k) for k in GenerationParams.names()}, **VIEW_DEFAULTS}
        lines = ["Defaults of %%mtp and %mtp compare (* set with %mtp config; a cell's flags override them):"]
        for key, default in defaults.items():
            value = self.defaults.get(key, default)
            shown = "template's" if key == "reasoning" and value is None else value
            mark = "*" if key in self.defaults else ""
            lines.append(f"  {'--' + key.replace('_', '-'):<15}{shown!s:<10}{mark}".rstrip())
        return "\n".join(lines)


MTPMagics.mtp.__doc__ = OVERVIEW + "".join(
    "\n" + handler.__doc__ for handler in (MTPMagics.load, MTPMagics.generate, MTPMagics.compare, MTPMagics.bench,
                                           MTPMagics.configure, MTPMagics.info, MTPMagics.unload,
                                           MTPMagics.connect)
)


def release_memory() -> None:
    """Collect the unreferenced model and return MLX's cached buffers to the system."""
    gc.collect()
    import mlx.core as mx

    mx.clear_cache()


def load_ipython_extension(ipython) -> None:
    from .blas import warn_once_if_reference_blas

    warn_once_if_reference_blas()  # MLX imported before `%load_ext mtpnb`: say so once, with the remedy
    ipython.register_magics(MTPMagics(ipython))


def unload_ipython_extension(ipython) -> None:
    manager = ipython.magics_manager
    magics = manager.registry.pop(MTPMagics.__name__, None)
    for kind in ("line", "cell"):
        manager.magics[kind].pop("mtp", None)
    if magics is not None and magics.model is not None:
        magics.model = None
        release_memory()
