"""The %mtp / %%mtp magics in a bare IPython InteractiveShell, on tiny random checkpoints: every
command, what it prints and returns, and every error as one line with no traceback."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import mtpnb
from mtpnb.magics import MTPMagics

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints(family="qwen3_5")


@pytest.fixture(scope="module")
def model(path):
    return mtpnb.load(path)


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mtpnb")
    yield shell
    shell.run_line_magic("unload_ext", "mtpnb")
    for name in ("r", "m", "pair"):
        shell.user_ns.pop(name, None)


@pytest.fixture
def loaded(ip, path, capsys):
    ip.run_line_magic("mtp", f"load {path}")
    capsys.readouterr()
    return ip


def magics(ip) -> MTPMagics:
    return ip.magics_manager.registry["MTPMagics"]


def one_line_error(ip, capsys, cell: str) -> str:
    """Run a cell the way a notebook does; return its error: one line on stderr, nothing else."""
    capsys.readouterr()
    result = ip.run_cell(cell)
    out, err = capsys.readouterr()
    assert isinstance(result.error_in_exec, UsageError), (cell, result.error_in_exec)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("UsageError: "), err
    return err.removeprefix("UsageError: ").strip()


# -- the extension ------------------------------------------------------------------------------------------
def test_load_unload_and_reload_the_extension(ip, path, capsys):
    assert ip.find_line_magic("mtp") is not None and ip.find_cell_magic("mtp") is not None
    ip.run_line_magic("mtp", f"load {path}")
    ip.run_line_magic("reload_ext", "mtpnb")  # a fresh magics object: no model
    assert magics(ip).model is None
    ip.run_line_magic("unload_ext", "mtpnb")
    assert ip.find_line_magic("mtp") is None and ip.find_cell_magic("mtp") is None
    assert "MTPMagics" not in ip.magics_manager.registry
    ip.run_line_magic("load_ext", "mtpnb")
    assert ip.find_line_magic("mtp") is not None


def test_bare_mtp_lists_the_commands(ip, capsys):
    ip.run_line_magic("mtp", "")
    out = capsys.readouterr().out
    for command in ("%mtp load", "%%mtp", "%mtp compare", "%mtp bench", "%mtp config", "%mtp info", "%mtp unload",
                    "%mtp connect"):
        assert command in out
    assert "Loaded: nothing" in out


def test_help_shows_every_command_and_flag(ip, capsys):
    ip.run_cell("%mtp?")
    out = capsys.readouterr().out
    for usage in ("%mtp load", "%%mtp [--depth D]", "%mtp compare", "%mtp bench", "%mtp config", "%mtp info",
                  "%mtp unload", "%mtp connect"):
        assert usage in out
    for flag in ("--quantize", "--revision", "--temperature", "--top-p", "--top-k", "--max-tokens", "--seed",
                 "--chat", "--no-stream", "--output", "--reset", "--api-key", "--depths", "--repeats", "--quick"):
        assert flag in out


# -- load, info, unload ---------------------------------------------------------------------------------------
def test_load_prints_the_summary_and_binds_the_model(ip, path, capsys):
    assert ip.run_line_magic("mtp", f"load {path} -o m") is None  # -o binds; nothing echoed
    returned = ip.user_ns["m"]
    out = capsys.readouterr().out
    assert isinstance(returned, mtpnb.Model) and ip.user_ns["m"] is returned is magics(ip).model
    info = returned.info()
    assert out.startswith(f"{info['name']}  ({info['path']})")
    assert "family     qwen3_5_text" in out
    assert "layers     4 (2 linear attention)" in out
    assert "MTP head   yes" in out
    assert f"{info['weights_mb']} MB" in out and "parameters " in out


def test_load_quantized_and_headless(ip, checkpoints, capsys):
    ip.run_line_magic("mtp", f"load {checkpoints(family='qwen3')} --quantize 8")
    assert "8-bit, group 64" in capsys.readouterr().out
    assert ip.run_line_magic("mtp", f"load {checkpoints(family='qwen3', mtp=None)}") is None  # no -o: None
    out = capsys.readouterr().out
    assert "MTP head   no" in out and "note       no MTP weights" in out


def test_info_and_unload(loaded, capsys):
    loaded.run_line_magic("mtp", "info")
    assert "MTP head   yes" in capsys.readouterr().out
    loaded.run_line_magic("mtp", "unload")
    assert capsys.readouterr().out.startswith("Unloaded ")
    assert magics(loaded).model is None
    loaded.run_line_magic("mtp", "unload")
    assert capsys.readouterr().out == "No model loaded.\n"


# -- %%mtp ----------------------------------------------------------------------------------------------------
def test_cell_streams_into_the_token_view_and_binds_the_result(loaded, model, capsys):
    assert loaded.run_cell_magic("mtp", "--depth 2 --max-tokens 12 -o r", PROMPT) is None
    result = loaded.user_ns["r"]
    out = capsys.readouterr().out
    assert isinstance(result, mtpnb.Result) and loaded.user_ns["r"] is result
    assert result.metrics.depth == 2 and 1 <= result.metrics.generated_tokens <= 12
    assert result.tokens == model.generate(PROMPT, depth=2, max_tokens=12).tokens
    assert f"-- {result.metrics.summary()}" in out  # the token view's text rendering, once finished


def test_cell_from_a_notebook_keeps_the_prompt_as_typed(loaded, model, capsys):
    loaded.run_cell("%%mtp --no-stream --max-tokens 6 -o r\nline one\n  line two\n")
    assert loaded.user_ns["r"].metrics.prompt_tokens == len(model.engine.encode("line one\n  line two"))


def test_no_stream_prints_the_text_and_the_metrics(loaded, model, capsys):
    assert loaded.run_cell_magic("mtp", "--no-stream --max-tokens 8", PROMPT) is None  # no -o: nothing returned
    text, summary, end = capsys.readouterr().out.rsplit("\n", 2)
    assert text == model.generate(PROMPT, max_tokens=8).text and end == ""
    assert summary.startswith("8 tokens | TTFT ") and "depth 3: acceptance " in summary


def test_every_sampling_flag_reaches_the_engine(loaded, model):
    flags = "--depth 1 --temperature 0.8 --top-p 0.9 --top-k 20 --min-p 0.05 --seed 3 --max-tokens 10 --stop q --stop z"
    assert loaded.run_cell_magic("mtp", f"{flags} --no-stream -o r", PROMPT) is None
    result = loaded.user_ns["r"]
    expected = model.generate(PROMPT, depth=1, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=3,
                              max_tokens=10, stop=("q", "z"))
    assert result.tokens == expected.tokens and result.metrics.depth == 1
    assert loaded.run_cell_magic("mtp", "--chat --reasoning off --max-tokens 5 --no-stream -o r", "hi") is None
    chat = loaded.user_ns["r"]
    assert chat.metrics.prompt_tokens == len(model.engine.encode("hi", chat=True, reasoning=False))


def test_charts_under_the_token_view(loaded, capsys):
    assert loaded.run_cell_magic("mtp", "--charts --max-tokens 6 -o r", PROMPT) is None
    result = loaded.user_ns["r"]
    assert result.metrics.generated_tokens >= 1
    assert f"-- {result.metrics.summary()}" in capsys.readouterr().out


# -- %mtp config ----------------------------------------------------------------------------------------------
def test_config_sets_defaults_that_cells_override(loaded, capsys):
    loaded.run_line_magic("mtp", "config --depth 1 --max-tokens 7 --no-stream --temperature 0.5 --seed 1")
    shown = capsys.readouterr().out
    assert "  --depth        1         *" in shown and "  --top-k        0\n" in shown
    assert loaded.run_cell_magic("mtp", "-o r", PROMPT) is None
    result = loaded.user_ns["r"]
    assert result.metrics.depth == 1 and result.metrics.generated_tokens <= 7
    assert capsys.readouterr().out.endswith(result.metrics.summary() + "\n")  # --no-stream from the config
    loaded.run_cell_magic("mtp", "--depth 2 --temperature 0 -o r", PROMPT)
    assert loaded.user_ns["r"].metrics.depth == 2
    loaded.run_line_magic("mtp", "config")
    assert "--max-tokens   7         *" in capsys.readouterr().out
    loaded.run_line_magic("mtp", "config --reset --top-k 5")
    shown = capsys.readouterr().out
    assert "  --depth        3\n" in shown and "  --top-k        5         *" in shown
    assert magics(loaded).defaults == {"top_k": 5}


def test_config_refuses_a_bad_value_and_keeps_the_old_ones(loaded, capsys):
    loaded.run_line_magic("mtp", "config --depth 2")
    assert one_line_error(loaded, capsys, "%mtp config --temperature -1") == (
        "%mtp config: temperature must be a number >= 0, not -1.0")
    assert magics(loaded).defaults == {"depth": 2}


# -- %mtp compare ---------------------------------------------------------------------------------------------
def test_compare_a_prompt_given_on_the_line(loaded, model):
    assert loaded.run_line_magic("mtp", f"compare --depth 2 --max-tokens 8 -o pair {PROMPT}") is None
    base, mtp = loaded.user_ns["pair"]
    assert loaded.user_ns["pair"] == (base, mtp)
    assert (base.metrics.depth, mtp.metrics.depth) == (0, 2)
    assert base.tokens == mtp.tokens == model.generate(PROMPT, depth=0, max_tokens=8).tokens  # greedy


def test_compare_in_a_cell_and_with_the_last_prompt(loaded, model):
    assert loaded.run_cell_magic("mtp", "compare --max-tokens 6 -o pair", "import os") is None
    base, _ = loaded.user_ns["pair"]
    assert base.metrics.prompt_tokens == len(model.engine.encode("import os"))
    loaded.run_cell_magic("mtp", "--no-stream --max-tokens 4", "class A:")
    assert loaded.run_line_magic("mtp", "compare --max-tokens 4 -o pair") is None
    base, mtp = loaded.user_ns["pair"]
    assert base.metrics.prompt_tokens == len(model.engine.encode("class A:")) and mtp.metrics.depth == 3


# -- %mtp bench ----------------------------------------------------------------------------------------------
def test_bench_the_loaded_model(loaded, capsys, monkeypatch):
    from mtpnb import bench

    short = [{"name": "add", "text": "def add(a, b):\n"}]
    monkeypatch.setattr(bench, "code_prompts", lambda count, modules=None: short[:count])
    assert loaded.run_line_magic(
        "mtp", "bench --quick --max-tokens 4 --depths 0,2 --temperature 0 --repeats 1 --prompts 1 --no-peers "
               "--no-phases -o rep") is None
    report = loaded.user_ns.pop("rep")
    assert isinstance(report, bench.BenchReport)
    assert [(r["engine"], r["depth"]) for r in report.rows()] == [("mtpnb", 0), ("mtpnb", 2)]
    assert report.data["settings"]["temperatures"] == [0.0] and len(report.data["settings"]["prompts"]) == 1
    assert report.summary() in capsys.readouterr().out


def test_bench_against_a_second_model(loaded, checkpoints, capsys, monkeypatch):
    from mtpnb import bench

    monkeypatch.setattr(bench, "code_prompts", lambda count, modules=None: [{"name": "add", "text": "def add(a, b):\n"}])
    other = checkpoints(family="qwen3_5", head="echo")
    assert loaded.run_line_magic(
        "mtp", f"bench --quick --max-tokens 4 --depths 0,1 --temperature 0 --prompts 1 --no-peers --no-phases "
               f"--compare {other} -o rep") is None
    report = loaded.user_ns.pop("rep")
    assert report.data["compare"]["model"]["path"] == str(other)
    assert [r["depth"] for r in report.data["compare"]["results"]] == [0, 1]
    assert "alternated in the same run with" in capsys.readouterr().out
    assert one_line_error(loaded, capsys, f"%mtp bench --quick --compare {other}/missing").startswith(
        "%mtp bench: ")


# -- %mtp connect ---------------------------------------------------------------------------------------------
def test_connect_to_a_served_model(ip, path, model, capsys):
    from mtpnb.server import Server

    with Server(path, port=0) as server:
        assert ip.run_line_magic("mtp", f"connect {server.url} -o m") is None
        remote = ip.user_ns["m"]
        out = capsys.readouterr().out
        assert f"({server.url})" in out and "MTP head   yes" in out
        assert magics(ip).model is remote is ip.user_ns["m"]
        assert ip.run_cell_magic("mtp", "--depth 2 --max-tokens 8 -o r", PROMPT) is None
        result = ip.user_ns["r"]
        assert result.tokens == model.generate(PROMPT, depth=2, max_tokens=8).tokens
        assert one_line_error(ip, capsys, "%mtp bench") == (
            "%mtp bench: a benchmark times the engine in this process: %mtp load a model")


# -- errors: one line, no traceback ---------------------------------------------------------------------------
COMMANDS = "load, compare, bench, config, info, unload, connect"
NO_MODEL = "no model loaded: run %mtp load [SOURCE] (or %mtp connect URL) first"


@pytest.mark.parametrize("cell, message", [
    (f"%%mtp\n{PROMPT}", f"%%mtp: {NO_MODEL}"),
    ("%mtp info", f"%mtp info: {NO_MODEL}"),
    (f"%mtp compare {PROMPT}", f"%mtp compare: {NO_MODEL}"),
    ("%mtp load /no/such/folder", "%mtp load: no model folder at /no/such/folder (and it is not a hub repo id "
                                  "like 'owner/name')"),
    ("%mtp load --quantize 5", "%mtp load: argument --quantize: invalid choice: 5 (choose from 4, 8)"),
    ("%mtp load --fast", "%mtp load: unrecognized arguments: --fast"),
    ("%mtp frobnicate", f"%mtp: unknown command 'frobnicate': use one of {COMMANDS}"),
    ("%mtp --depth 3", f"%mtp: unknown command '--depth': use one of {COMMANDS} (to generate, write %%mtp on the "
                       "cell's first line)"),
    ("%%mtp info\nx", "%%mtp: info is a line magic: %mtp info (one %)"),
    ("%mtp info now", "%mtp info: unrecognized arguments: now"),
    ("%mtp unload everything", "%mtp unload: unrecognized arguments: everything"),
    ("%mtp config --depth three", "%mtp config: argument --depth: invalid int value: 'three'"),
    ("%mtp connect", "%mtp connect: the following arguments are required: url"),
    ("%mtp bench", f"%mtp bench: {NO_MODEL}"),
    ("%mtp bench --depths 9", "%mtp bench: argument --depths: depths are integers from 0 to 8"),
    ("%mtp bench --temperature hot", "%mtp bench: argument --temperatures/--temperature: expected comma-separated "
                                     "numbers, not 'hot'"),
    ("%mtp connect localhost:8000", "%mtp connect: url must look like http://host:port, not 'localhost:8000'"),
])
def test_errors_without_a_model(ip, capsys, cell, message):
    assert one_line_error(ip, capsys, cell) == message


@pytest.mark.parametrize("cell, message", [
    (f"%%mtp --depth 9\n{PROMPT}", "%%mtp: depth must be an integer from 0 (plain decoding) to 8, not 9"),
    (f"%%mtp --depth x\n{PROMPT}", "%%mtp: argument --depth: invalid int value: 'x'"),
    (f"%%mtp --top-p 0\n{PROMPT}", "%%mtp: top_p must be in (0, 1], not 0.0"),
    (f"%%mtp --max-tokens 0 --no-stream\n{PROMPT}", "%%mtp: max_tokens must be an integer >= 1, not 0"),
    (f"%%mtp --speed 3\n{PROMPT}", "%%mtp: unrecognized arguments: --speed 3"),
    (f"%%mtp -o 2x\n{PROMPT}", "%%mtp: argument -o/--output: not a Python name: '2x'"),
    ("%mtp load -o a.b", "%mtp load: argument -o/--output: not a Python name: 'a.b'"),
    ("%%mtp --depth 2\n  \n", "%%mtp: the cell is empty: write the prompt below the %%mtp line"),
    ("%mtp compare", "%mtp compare: no prompt: give one after the command, write it in a %%mtp compare cell, "
                     "or run a %%mtp cell first"),
    (f"%mtp compare --depth 0 {PROMPT}", "%mtp compare: a comparison needs a depth >= 1, not 0"),
    (f"%%mtp compare --seed -1\n{PROMPT}", "%%mtp compare: seed must be a non-negative integer or None, not -1"),
])
def test_errors_with_a_model(loaded, capsys, cell, message):
    assert one_line_error(loaded, capsys, cell) == message


def test_compare_needs_an_mtp_head(ip, checkpoints, capsys):
    ip.run_line_magic("mtp", f"load {checkpoints(family='qwen3', mtp=None)}")
    message = one_line_error(ip, capsys, f"%mtp compare {PROMPT}")
    assert message.startswith("%mtp compare: ") and message.endswith("has no MTP head: there is no depth to compare "
                                                                      "with depth 0")


def test_a_failed_load_keeps_the_loaded_model(loaded, capsys):
    before = magics(loaded).model
    one_line_error(loaded, capsys, "%mtp load /no/such/folder")
    assert magics(loaded).model is before


def test_an_unreachable_server(ip, capsys):
    message = one_line_error(ip, capsys, "%mtp connect http://127.0.0.1:9")
    assert message.startswith("%mtp connect: cannot reach the mtpnb server at http://127.0.0.1:9: ")
