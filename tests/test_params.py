"""The parameter contract (mtpnb.params): every front end's checks, in one place, without MLX."""

import argparse
import math

import pytest

from mtpnb.errors import MTPNBError
from mtpnb.params import (GENERATION_ARGUMENTS, MAX_DEPTH, MIN_TEMPERATURE, MODEL_ARGUMENTS, GenerationParams,
                          add_arguments, depth_list, generation_params, model_options, temperature_list)


@pytest.mark.parametrize("params, message", [
    # silently empty output before (issue 15, item 3)
    (dict(temperature=math.nan), "temperature must be a finite number, not nan"),
    (dict(temperature=math.inf), "temperature must be a finite number, not inf"),
    (dict(temperature=1e-300), f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, not 1e-300"),
    (dict(top_p=math.nan), "top_p must be a finite number, not nan"),
    (dict(min_p=-math.inf), "min_p must be a finite number, not -inf"),
    # wrong types
    (dict(temperature=True), "temperature must be a number, not True"),
    (dict(temperature="0.7"), "temperature must be a number, not '0.7'"),
    (dict(top_k=2.0), "top_k must be an integer, not 2.0"),
    (dict(depth=True), "depth must be an integer, not True"),
    (dict(max_tokens=None), "max_tokens must be an integer, not None"),
    (dict(chat=1), "chat must be true or false, not 1"),
    (dict(reasoning="yes"), "reasoning must be true, false or None, not 'yes'"),
    (dict(seed=1.5), "seed must be an integer, not 1.5"),
    (dict(stop=[""]), "stop must be a string or a list of non-empty strings"),
    (dict(stop=5), "stop must be a string or a list of non-empty strings"),
    # out of range (issue 15, item 4: a seed of 2**64 was a raw TypeError)
    (dict(seed=2**64), "seed must be below 2**64 (MLX's generator takes 64 bits), not 18446744073709551616"),
    (dict(seed=-1), "seed must be a non-negative integer or None, not -1"),
    (dict(temperature=-0.5), "temperature must be a number >= 0, not -0.5"),
    (dict(top_p=0), "top_p must be in (0, 1], not 0"),
    (dict(min_p=1), "min_p must be in [0, 1), not 1"),
    (dict(top_k=-1), "top_k must be an integer >= 0 (0 = off), not -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, not 0"),
    (dict(depth=MAX_DEPTH + 1), f"depth must be an integer from 0 (plain decoding) to {MAX_DEPTH}, not 9"),
    (dict(temprature=0.5), "unknown parameter 'temprature'; known: depth, max_tokens, temperature"),
])
def test_bad_parameters_get_one_line_naming_the_parameter(params, message):
    with pytest.raises(MTPNBError) as e:
        GenerationParams.of(**params)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_good_parameters_are_normalized():
    p = GenerationParams.of(temperature=1, top_p=1, min_p=0, seed=2**64 - 1, stop="###", reasoning=False)
    assert (p.temperature, p.top_p, p.min_p) == (1.0, 1.0, 0.0) and type(p.temperature) is float
    assert p.seed == 2**64 - 1 and p.stop == ("###",) and p.reasoning is False
    assert p.sampling_settings == (1.0, 1.0, 0, 0.0)
    assert GenerationParams.of(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE
    assert GenerationParams.of(stop=None).stop == ()


def test_flag_tables_parse_to_engine_and_loader_arguments():
    parser = argparse.ArgumentParser()
    add_arguments(parser, GENERATION_ARGUMENTS)
    add_arguments(parser, MODEL_ARGUMENTS)
    args = parser.parse_args(["--depth", "2", "--stop", "a", "--stop", "b", "--reasoning", "off", "--no-chat",
                              "--quantize", "4", "--revision", "main"])
    assert generation_params(args) == {"depth": 2, "stop": ("a", "b"), "reasoning": False, "chat": False}
    GenerationParams.of(**generation_params(args))
    assert model_options(args) == {"quantize": 4, "revision": "main"}
    # every generation parameter has its flag
    assert {flags[0][2:].replace("-", "_") for flags, _ in GENERATION_ARGUMENTS} == set(GenerationParams.names())


def test_bench_list_types():
    assert depth_list("0, 1,3") == [0, 1, 3]
    assert temperature_list("0,0.6") == [0.0, 0.6]
    for bad in ("9", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            depth_list(bad)
    for bad in ("-1", "nan", "1e-9", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            temperature_list(bad)
