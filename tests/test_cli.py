"""The `mtpnb` command: every verb as a subprocess (`python -m mtpnb ...`) on tiny random checkpoints,
with its output, error paths and exit codes; the rest of the error table in-process through `main`."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mtpnb
from mtpnb import cli
from mtpnb.server.app import refusal
from mtpnb.terminal import STYLES, legend, render_prompt, render_token, use_color

ROOT = Path(mtpnb.__file__).resolve().parent.parent
PROMPT = "def f(x):"
GENERATE = ["--depth", "3", "--max-tokens", "40"]  # on the echo-head checkpoint: every token kind shows
SUMMARY = re.compile(r"^\d+ tokens \| TTFT \d+ ms \| decode [\d.]+ tok/s \| end-to-end [\d.]+ tok/s .*\| peak \d+ MB$")


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "LD_PRELOAD")}
    e.update({"PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "MTPNB_NO_OPENBLAS": "1", **extra})
    return e


def mtpnb_cmd(*args, stdin: str | None = None, timeout: float = 120, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpnb", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env(**extra_env), timeout=timeout,
                          stdin=subprocess.DEVNULL if stdin is None else None)


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.strip()


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints(head="echo")


@pytest.fixture(scope="module")
def model(path):
    return mtpnb.load(path)


@pytest.fixture(scope="module")
def expected(model):
    return model.generate(PROMPT, depth=3, max_tokens=40)


# -- generate -----------------------------------------------------------------------------------------------
def test_generate_on_a_terminal_colours_every_kind_then_legend_and_metrics(path, expected):
    assert {e.kind for e in expected.events} == set(mtpnb.TOKEN_KINDS)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mtpnb", "generate", "-m", str(path), *GENERATE, PROMPT],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env(TERM="xterm"))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 0, err
    tokens = "".join(render_token(e.kind, e.text, True) for e in expected.events)
    rendered = f"{render_prompt(PROMPT, True)}{tokens}\n{legend()}\n"
    assert out.decode().replace("\r\n", "\n") == rendered
    assert "\x1b[38;5;166;9m" in tokens and "\x1b[38;5;214;7m" in tokens  # struck-through rejection, correction
    assert SUMMARY.match(err.strip()) and "depth 3: acceptance" in err


def _sgr_attributes(sgr: str) -> set[int]:
    """The attributes an SGR parameter list sets, its 38;5;N / 48;5;N colours left out."""
    params, attributes = [int(x) for x in sgr.split(";") if x], set()
    while params:
        p = params.pop(0)
        if p in (38, 48):
            del params[:2]
        else:
            attributes.add(p)
    return attributes


def test_no_output_token_is_underlined_and_accepted_drafts_are_shaded_with_a_line_above():
    # An underlined space reads as "_" in code ("def_f"): no kind is underlined (4) or double underlined
    # (21); an accepted draft is shaded (a background colour) with a line above (53), as in the widget.
    for kind, (_, sgr, _) in STYLES.items():
        assert not _sgr_attributes(sgr) & {4, 21}, kind
    accepted = STYLES["accepted"][1]
    assert "48;5;" in accepted and 53 in _sgr_attributes(accepted)
    assert "accepted draft\x1b[0m (shaded, line above)" in legend()
    assert render_token("accepted", "  return", True) == f"\x1b[{accepted}m  return\x1b[0m"


def test_generate_piped_writes_exactly_the_text_and_the_metrics_to_stderr(path, model):
    proc = mtpnb_cmd("generate", "-m", path, "--max-tokens", "12", stdin="import os\n")
    assert proc.returncode == 0, proc.stderr
    text = model.generate("import os\n", max_tokens=12).text
    assert proc.stdout == (text if text.endswith("\n") else text + "\n")
    assert "\x1b[" not in proc.stdout and SUMMARY.match(proc.stderr.strip())


def test_generate_json_is_the_whole_result(path, expected, capsys):
    assert cli.main(["generate", "-m", str(path), *GENERATE, "--json", PROMPT]) == 0
    out, err = capsys.readouterr()
    result = mtpnb.Result.from_dict(json.loads(out))
    assert err == "" and result.tokens == expected.tokens and result.text == expected.text
    assert [(e.kind, e.token) for e in result.events] == [(e.kind, e.token) for e in expected.events]
    assert result.metrics.depth == 3 and result.metrics.acceptance_rate == expected.metrics.acceptance_rate


def test_generate_without_a_head_notes_it(checkpoints, capsys):
    assert cli.main(["generate", "-m", str(checkpoints(family="qwen3", mtp=None)), "--max-tokens", "3", "x"]) == 0
    note, summary = capsys.readouterr().err.strip().split("\n")
    assert note.startswith("note: no MTP weights in ") and SUMMARY.match(summary)


def test_generate_a_bad_value_exits_2_with_one_line(path):
    assert one_line_failure(mtpnb_cmd("generate", "-m", path, "--depth", "12", PROMPT)) == (
        "mtpnb generate: depth must be an integer from 0 (plain decoding) to 8, not 12")


def test_generate_into_a_closed_pipe_exits_quietly(path):
    proc = subprocess.Popen([sys.executable, "-m", "mtpnb", "generate", "-m", str(path), "--max-tokens", "64", PROMPT],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    proc.stdout.close()  # the reader is gone before the first token is written
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 0 and "Traceback" not in err, err


# -- info -----------------------------------------------------------------------------------------------------
def test_info_says_which_blas_and_how_it_was_loaded(path):
    from mtpnb.blas import openblas_path

    proc = mtpnb_cmd("info", "-m", path, "--quantize", "4", MTPNB_NO_OPENBLAS="")  # as a user runs it
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.match(r"mtpnb \S+, MLX \S+, default device: (cpu|gpu)$", lines[0])
    assert lines[1].startswith("BLAS: ")
    if sys.platform.startswith("linux") and openblas_path():
        assert lines[1].startswith("BLAS: OpenBLAS (") and "loaded in-process by `import mtpnb`" in lines[1]
    assert lines[2] == f"{path.name}  ({path})"
    assert "  MTP head   yes" in lines and "  note       quantized at load to 4-bit, group 64" in lines
    assert any(line.startswith("  weights    float32, 4-bit, group 64, ") for line in lines)


def test_info_prints_the_environment_even_when_the_model_is_missing(capsys):
    assert cli.main(["info", "-m", "/no/such/model"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("mtpnb ") and out.count("\n") == 2 and "\nBLAS: " in out
    assert err == "mtpnb info: no model folder at /no/such/model (and it is not a hub repo id like 'owner/name')\n"


# -- bench ------------------------------------------------------------------------------------------------------
def test_bench(path, tmp_path):
    (tmp_path / "p.py").write_text("def add(a, b):\n")
    proc = mtpnb_cmd("bench", path, "--quick", "--max-tokens", "4", "--depths", "0,1", "--temperatures", "0",
                     "--no-peers", "--no-phases", "--prompt-file", tmp_path / "p.py", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(r["engine"], r["depth"]) for r in report["results"]] == [("mtpnb", 0), ("mtpnb", 1)]
    assert proc.stdout.startswith(f"mtpnb bench: {path.name} ")  # the table; progress lines go to stderr
    assert report["command"].startswith(f"mtpnb bench {path} --quick")


def test_bench_says_when_there_are_fewer_code_prompts_than_asked(path, capsys):
    args = ["bench", str(path), "--prompts", "1000", "--max-tokens", "2", "--repeats", "1", "--warmup", "0",
            "--depths", "0", "--temperatures", "0", "--no-peers", "--no-phases", "--quiet"]
    assert cli.main(args) == 0
    available = len(mtpnb.bench.code_prompts(1000, modules=mtpnb.bench.heldout_modules(path)))
    assert f"mtpnb bench: note: --prompts 1000: there are {available} code prompts, and all of them run" \
        in capsys.readouterr().err


def test_bench_of_a_missing_model(capsys):
    assert cli.main(["bench", "/no/such/model"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mtpnb bench: no model folder at /no/such/model") and err.count("\n") == 1


# -- serve, and generate / info against it --------------------------------------------------------------------
def test_serve_then_generate_and_info_through_it(path, expected, capsys):
    server = subprocess.Popen([sys.executable, "-m", "mtpnb", "serve", str(path), "--port", "0", "--quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env())
    try:
        lines = [server.stdout.readline(), server.stdout.readline()]
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", lines[1])
        assert lines[0].startswith("mtpnb serve: model ") and match, lines
        url = match.group(1)
        assert cli.main(["generate", "--url", url, *GENERATE, "--json", PROMPT]) == 0
        assert mtpnb.Result.from_dict(json.loads(capsys.readouterr().out)).tokens == expected.tokens
        assert cli.main(["info", "--url", url]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{path.name}  ({url})\n") and "MTP head   yes" in out
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
        server.stdout.close()
        server.stderr.close()


def test_serve_says_in_its_own_words_that_a_model_has_no_head(checkpoints):
    no_head = checkpoints(family="qwen3_5", mtp=None)
    server = subprocess.Popen([sys.executable, "-m", "mtpnb", "serve", str(no_head), "--port", "0", "--quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(PYTHONWARNINGS="default"))
    try:
        assert server.stdout.readline() == f"mtpnb serve: model {no_head.name} (no MTP head: plain decoding)\n"
        assert "listening on" in server.stdout.readline()
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
        server.stdout.close()
        assert server.stderr.read() == "mtpnb serve: stopped (SIGINT)\n"  # and not the loader's UserWarning too
        server.stderr.close()


# -- lab --------------------------------------------------------------------------------------------------------
@pytest.fixture
def notebooks(tmp_path):
    for name in ("02_b.ipynb", "01_a.ipynb"):
        (tmp_path / name).write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    return tmp_path


@pytest.mark.parametrize("uid", [1000, 0])
def test_lab_dry_run_prints_the_command(notebooks, capsys, monkeypatch, uid):
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    argv = ["lab", "--dir", str(notebooks), "--no-browser", "--port", "8899", "--dry-run", "--", "--debug"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    root = " --allow-root" if uid == 0 else ""  # JupyterLab refuses root without it: mtpnb lab adds it, and says so
    assert out == (f"{sys.executable} -m jupyterlab --ServerApp.root_dir={notebooks} --no-browser "
                   f"--ServerApp.port=8899{root} --debug {notebooks / '01_a.ipynb'}\n")
    assert err == ("mtpnb lab: running as root, so JupyterLab gets --allow-root\n" if uid == 0 else "")


def test_lab_starts_jupyterlab_and_stops_on_a_signal(notebooks):
    proc = subprocess.Popen([sys.executable, "-m", "mtpnb", "lab", "--dir", str(notebooks), "--no-browser",
                             "--port", "0", "--", "--ServerApp.token=test-token"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(JUPYTER_RUNTIME_DIR=str(notebooks / "runtime")))
    try:
        deadline, log = time.monotonic() + 90, ""
        while "is running at" not in log and time.monotonic() < deadline and proc.poll() is None:
            log += proc.stderr.readline()
        assert "is running at" in log and f"Serving notebooks from local directory: {notebooks}" in log, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        proc.stderr.close()


def test_lab_finds_the_repository_notebooks():
    if not any((ROOT / "notebooks").glob("*.ipynb")):
        pytest.skip("no tutorial notebooks in this checkout")
    assert cli.find_notebooks() == ROOT / "notebooks"
    assert cli.notebook_folders()[1:] and all(f.parts[-3:] == ("share", "mtpnb", "notebooks")
                                              for f in cli.notebook_folders()[1:])  # where a wheel puts them


# -- train ------------------------------------------------------------------------------------------------------
def test_train_passes_its_arguments_through(capsys):
    pytest.importorskip("torch")
    proc = mtpnb_cmd("train", "--smoke")  # its own argparse: its usage, then the error
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.endswith("python -m mtpnb.train: error: the following arguments are required: --out\n")
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mtpnb.train") and "--smoke" in out


# -- the command itself -------------------------------------------------------------------------------------------
def test_no_command_and_version(capsys):
    assert one_line_failure(mtpnb_cmd()) == "mtpnb: the following arguments are required: COMMAND (see mtpnb --help)"
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"mtpnb {mtpnb.__version__}\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--bogus", "x"], "mtpnb generate: unrecognized arguments: --bogus (see mtpnb generate --help)"),
    (["generate", "--quantize", "3", "x"],
     "mtpnb generate: argument --quantize: invalid choice: 3 (choose from 4, 8) (see mtpnb generate --help)"),
    (["generate", "--top-p", "2", "x"], "mtpnb generate: top_p must be in (0, 1], not 2.0"),
    (["generate", "--temperature", "-1", "x"], "mtpnb generate: temperature must be a number >= 0, not -1.0"),
    (["generate", "--reasoning", "maybe", "x"], "mtpnb generate: argument --reasoning: invalid choice: 'maybe' "
                                                "(choose from 'on', 'off') (see mtpnb generate --help)"),
    (["generate", "-m", "/no/such", "x"], "mtpnb generate: no model folder at /no/such (and it is not a hub repo id "
                                          "like 'owner/name')"),
    (["generate", "-m", "/no/such", "--depth", "12", "x"],  # checked before a model is loaded
     "mtpnb generate: depth must be an integer from 0 (plain decoding) to 8, not 12"),
    (["generate", "--url", "nowhere", "x"], "mtpnb generate: url must look like http://host:port, not 'nowhere'"),
    (["info", "extra"], "mtpnb info: unrecognized arguments: extra (see mtpnb info --help)"),
    (["lab", "--dir", "EMPTY", "--dry-run"], "mtpnb lab: no notebooks (*.ipynb) in EMPTY"),
    (["serve", "--host", "0.0.0.0"], f"mtpnb serve: {refusal('0.0.0.0')}"),
    (["lab", "--port", "many"], "mtpnb lab: argument --port: invalid int value: 'many' (see mtpnb lab --help)"),
    (["bench", "--depths", "9"], "mtpnb bench: argument --depths: depths are integers from 0 to 8 (see mtpnb bench "
                                 "--help)"),
    (["frobnicate"], "mtpnb: argument COMMAND: invalid choice: 'frobnicate' (choose from 'generate', 'info', 'bench', "
                     "'lab', 'train', 'serve') (see mtpnb --help)"),
])
def test_bad_input_exits_2_with_one_line(path, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("MTPNB_API_KEY", raising=False)
    argv = [PROMPT if a == "x" else str(tmp_path) if a == "EMPTY" else a for a in argv]
    message = message.replace("EMPTY", str(tmp_path))
    if argv[0] == "generate" and "-m" not in argv and "--url" not in argv:
        argv += ["-m", str(path)]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == message + "\n"


def test_prompt_from_standard_input(path, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert cli.main(["generate", "-m", str(path)]) == 2
    assert capsys.readouterr().err == "mtpnb generate: the prompt on standard input is empty\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    assert cli.main(["generate", "-m", str(path), "--max-tokens", "4", "-"]) == 0
    assert SUMMARY.match(capsys.readouterr().err.strip())


def test_color_forced_and_refused(path, expected, capsys, monkeypatch):
    assert cli.main(["generate", "-m", str(path), *GENERATE, "--color", PROMPT]) == 0
    assert capsys.readouterr().out.endswith(legend() + "\n")
    monkeypatch.setenv("NO_COLOR", "1")

    class Terminal:
        def isatty(self):
            return True

    assert use_color(Terminal(), None) is False and use_color(Terminal(), True) is True
    monkeypatch.delenv("NO_COLOR")
    assert use_color(Terminal(), None) is True and use_color(Terminal(), False) is False


def test_rendering_keeps_styles_on_their_line_and_neutralises_control_characters():
    assert render_token("correction", "a\nb", True) == "\x1b[38;5;214;7ma\x1b[0m\n\x1b[38;5;214;7mb\x1b[0m"
    assert render_token("rejected", "x\n\t", True) == "\x1b[38;5;166;9mx\u21b5\u21e5\x1b[0m"  # shown, not laid out
    assert render_token("plain", "\x1b[2Jok\x07", True) == "\u241b[2Jok\u2407"  # no escape reaches the terminal
    assert render_token("rejected", "x", False) == "" and render_token("bonus", "\x1b", False) == "\x1b"
    assert render_prompt("p", False) == "" and render_prompt("p\x1b", True) == "\x1b[2mp\u241b\x1b[0m"


def test_unexpected_errors_exit_1_with_the_traceback(path, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err
    assert err.endswith("mtpnb info: unexpected error (the traceback is above)\n")


def test_interrupted(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_info", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "\nmtpnb info: interrupted\n"
