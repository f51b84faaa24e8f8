"""What a generation may be asked: the parameters, their checks (the only ones), the depth limit, and
the command-line flags that spell them. Pure Python, no MLX: the remote client and the widgets
attached to a server use it on a machine without MLX, and every front end (Python API, widgets,
magics, CLI, server, bench) checks its input here, so a bad value gets the same one-line message
everywhere.

    params = GenerationParams.of(depth=3, temperature=0.7)      # MTPNBError on anything wrong
    Sampling(*params.sampling_settings)                          # the engine builds the MLX side

The rules, each with a one-line error that names the parameter:
- numbers are int or float (never bool, never a string), finite (no NaN, no infinity);
- integers are integers (a bool is not one); flags are True / False (1 and "yes" are not);
- temperature is 0 (greedy) or at least MIN_TEMPERATURE: below that, sampling is greedy in all but
  name, and far below it the scaled log-probabilities overflow and the output comes back empty;
- top_p in (0, 1]; top_k >= 0 (0 = off); min_p in [0, 1); max_tokens >= 1;
  seed None or 0 .. 2**64 - 1 (what MLX's generator takes); depth 0 .. MAX_DEPTH.
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass, fields

from .errors import MTPNBError

MAX_DEPTH = 8  # drafts per verify: past this the verify's cost outgrows any acceptance seen in practice
MIN_TEMPERATURE = 0.01  # the smallest positive temperature (vLLM's floor too)
MAX_SEED = 2**64 - 1
# With a draft vocabulary (draft_vocab.json), how many tokens of a generation's own context outside it its head
# may draft too, unless the file says ("context"); at most a quarter more rows for the default model
# (mtpnb.model.DraftVocabulary).
DRAFT_CONTEXT = 1024


# -- one value ------------------------------------------------------------------------------------
def check_number(name: str, value) -> float:
    """A finite real number (int or float, not bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MTPNBError(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise MTPNBError(f"{name} must be a finite number, not {value!r}")
    return value


def check_integer(name: str, value) -> int:
    """An integer (not bool) as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MTPNBError(f"{name} must be an integer, not {value!r}")
    return int(value)


def check_flag(name: str, value, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        what = "true, false or None" if allow_none else "true or false"
        raise MTPNBError(f"{name} must be {what}, not {value!r}")
    return value


def check_depth(value) -> int:
    depth = check_integer("depth", value)
    if not 0 <= depth <= MAX_DEPTH:
        raise MTPNBError(f"depth must be an integer from 0 (plain decoding) to {MAX_DEPTH}, not {value!r}")
    return depth


def check_temperature(value) -> float:
    t = check_number("temperature", value)
    if t < 0:
        raise MTPNBError(f"temperature must be a number >= 0, not {value!r}")
    if 0 < t < MIN_TEMPERATURE:
        raise MTPNBError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, not {value!r}")
    return t


def check_sampling(temperature, top_p, top_k, min_p) -> tuple[float, float, int, float]:
    """The four settings of the target distribution, checked (mtpnb.sampling.Sampling calls this)."""
    temperature = check_temperature(temperature)
    top_p_ = check_number("top_p", top_p)
    if not 0 < top_p_ <= 1:
        raise MTPNBError(f"top_p must be in (0, 1], not {top_p!r}")
    top_k_ = check_integer("top_k", top_k)
    if top_k_ < 0:
        raise MTPNBError(f"top_k must be an integer >= 0 (0 = off), not {top_k!r}")
    min_p_ = check_number("min_p", min_p)
    if not 0 <= min_p_ < 1:
        raise MTPNBError(f"min_p must be in [0, 1), not {min_p!r}")
    return temperature, top_p_, top_k_, min_p_


# -- a generation's parameters ----------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationParams:
    depth: int = 3  # drafts per verify; 0 = plain autoregressive decoding
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (EOS always stops)
    chat: bool = False  # apply the chat template to a text prompt
    reasoning: bool | None = None  # chat templates with a thinking switch: on / off / template default

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("depth", check_depth(self.depth))
        max_tokens = check_integer("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise MTPNBError(f"max_tokens must be an integer >= 1, not {self.max_tokens!r}")
        put("max_tokens", max_tokens)
        for name, value in zip(("temperature", "top_p", "top_k", "min_p"),
                               check_sampling(self.temperature, self.top_p, self.top_k, self.min_p)):
            put(name, value)
        if self.seed is not None:
            seed = check_integer("seed", self.seed)
            if seed < 0:
                raise MTPNBError(f"seed must be a non-negative integer or None, not {self.seed!r}")
            if seed > MAX_SEED:
                raise MTPNBError(f"seed must be below 2**64 (MLX's generator takes 64 bits), not {self.seed!r}")
            put("seed", seed)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise MTPNBError("stop must be a string or a list of non-empty strings")
        put("stop", tuple(stop))
        put("chat", check_flag("chat", self.chat))
        put("reasoning", check_flag("reasoning", self.reasoning, allow_none=True))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def of(cls, **params) -> "GenerationParams":
        """The checked parameters from keyword arguments; an unknown name is an error too."""
        unknown = sorted(set(params) - set(cls.names()))
        if unknown:
            raise MTPNBError(f"unknown parameter {unknown[0]!r}; known: {', '.join(cls.names())}")
        return cls(**params)

    @property
    def sampling_settings(self) -> tuple[float, float, int, float]:
        """(temperature, top_p, top_k, min_p): the arguments of mtpnb.sampling.Sampling."""
        return self.temperature, self.top_p, self.top_k, self.min_p


# -- the command-line flags (CLI, %mtp magics, mtpnb serve, mtpnb bench) ----------------------------
# (flags, argparse keyword arguments). Every default is None, meaning "not given": the engine's default
# (or, in a notebook, %mtp config's) applies.
_D = GenerationParams  # the defaults quoted in the help texts
GENERATION_ARGUMENTS = (
    (("--depth",), {"type": int, "metavar": "D",
                    "help": f"drafts per verify step, 0..{MAX_DEPTH}; 0 = plain decoding (default {_D.depth})"}),
    (("--max-tokens",), {"type": int, "metavar": "N", "help": f"most tokens to generate (default {_D.max_tokens})"}),
    (("--temperature",), {"type": float, "metavar": "T",
                          "help": f"sampling temperature; 0 = greedy, else >= {MIN_TEMPERATURE} "
                                  f"(default {_D.temperature})"}),
    (("--top-p",), {"type": float, "metavar": "P", "help": f"nucleus sampling mass (default {_D.top_p})"}),
    (("--top-k",), {"type": int, "metavar": "K", "help": f"keep the K likeliest tokens; 0 = off (default {_D.top_k})"}),
    (("--min-p",), {"type": float, "metavar": "P",
                    "help": f"drop tokens below P x the likeliest one's probability (default {_D.min_p})"}),
    (("--seed",), {"type": int, "metavar": "S", "help": "random seed, for a repeatable sampled output"}),
    (("--stop",), {"action": "append", "metavar": "TEXT", "help": "stop at this text (repeatable)"}),
    (("--chat",), {"action": argparse.BooleanOptionalAction,
                   "help": "wrap the prompt in the model's chat template as a user message"}),
    (("--reasoning",), {"choices": ("on", "off"),
                        "help": "thinking on or off, for chat templates that have the switch"}),
)
MODEL_ARGUMENTS = (
    (("--quantize",), {"type": int, "choices": (4, 8), "help": "quantize the weights at load (bits)"}),
    (("--dtype",), {"choices": ("float32", "bfloat16", "float16"), "help": "dtype of the float weights (default: float32 on the CPU, "
                                                                   "the stored one on a GPU)"}),
    (("--revision",), {"metavar": "R", "help": "hub revision of the model"}),
)
MODEL_OPTIONS = ("quantize", "dtype", "revision")  # mtpnb.load's keyword arguments, one per flag above


def add_arguments(parser, table) -> None:
    """Add a flag table's flags to an argparse parser or argument group."""
    for flags, options in table:
        parser.add_argument(*flags, **options)


def generation_params(args: argparse.Namespace) -> dict:
    """The generation flags that were given, as keyword arguments of Model.generate / Model.stream; checked
    here (MTPNBError), so that a bad value fails before a model is loaded."""
    params = {}
    for name in GenerationParams.names():
        value = getattr(args, name, None)
        if value is not None:
            params[name] = (value == "on") if name == "reasoning" else tuple(value) if name == "stop" else value
    GenerationParams.of(**params)
    return params


def model_options(args: argparse.Namespace) -> dict:
    """The model flags that were given, as keyword arguments of mtpnb.load."""
    return {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k, None) is not None}


def depth_list(text: str) -> list[int]:
    """"0,1,3" -> [0, 1, 3] (argparse type of the bench's --depths)."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or any(not 0 <= v <= MAX_DEPTH for v in values):
        raise argparse.ArgumentTypeError(f"depths are integers from 0 to {MAX_DEPTH}")
    return values


def temperature_list(text: str) -> list[float]:
    """"0,0.6" -> [0.0, 0.6] (argparse type of the bench's --temperatures)."""
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one temperature")
    try:
        return [check_temperature(v) for v in values]
    except MTPNBError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
