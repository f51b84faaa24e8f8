"""Every tutorial notebook executes top to bottom against the embedded default model.

Each notebook has a `parameters` cell (papermill's convention); CI injects the smaller values of
CI_PARAMETERS in a cell right after it, as papermill does, and nbclient runs the copy. The kernel is
a plain one, as `jupyter lab` starts it (no LD_PRELOAD: `import mtpnb`, first in every notebook, loads
OpenBLAS where it is installed), with this checkout first on its path.

MTPNB_NOTEBOOK_MODEL=/some/model/folder runs them against another model (e.g. a `make_checkpoint`
folder while the default model is absent). Committed notebooks must carry no outputs.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from mtpnb.blas import openblas_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
DEFAULT_MODEL = REPO / "mtpnb" / "default_model"
CELL_TIMEOUT_S = 300

# What CI runs: each notebook a minute or so on 2 shared cores.
CI_PARAMETERS = {
    "00_live_demo": {"AUTORUN": True, "MAX_TOKENS": 32},
    "01_quickstart": {"MAX_TOKENS": 48},
    "02_why_speculative_decoding_works": {"RUNS": 5, "MAX_TOKENS": 64, "DEPTHS": [1, 2, 3], "MAX_VERIFY": 4},
    "03_exact_sampling": {"TRIALS": 20_000, "SAMPLES": 150},
    "04_depth_and_sampling_sweeps": {"DEPTHS": [0, 1, 2, 3], "TEMPERATURES": [0.0, 0.8], "MAX_TOKENS": 48,
                                     "PROMPTS": 2},
    "05_inside_the_mtp_head": {"MAX_TOKENS": 32},
    "06_bring_your_own_model": {},
}

WIDGET = "application/vnd.jupyter.widget-view+json"
PLOTLY = "application/vnd.plotly.v1+json"


def model_override() -> str | None:
    return os.environ.get("MTPNB_NOTEBOOK_MODEL") or None


def require_model() -> None:
    if model_override() is None and not (DEFAULT_MODEL / "config.json").exists():
        pytest.skip(f"the embedded default model is absent ({DEFAULT_MODEL.relative_to(REPO)}/ has no "
                    "config.json): the notebooks teach on it (MTPNB_NOTEBOOK_MODEL=<folder> runs them on another)")


def inject_parameters(nb, parameters: dict):
    """Add papermill's 'injected-parameters' cell after the 'parameters' cell."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters injected by the test suite\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    cell.id = "injected-parameters"
    nb.cells.insert(index + 1, cell)
    return nb


def notebook_parameters(name: str) -> dict:
    parameters = dict(CI_PARAMETERS.get(name, {}))
    if model_override():
        parameters["MODEL"] = model_override()
    return parameters


def kernel_env(extra_path: Path | None = REPO) -> dict:
    """A plain kernel's environment (nothing preloaded), with extra_path first on its Python path."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    return env


def execute(path: Path, parameters: dict):
    nb = inject_parameters(nbformat.read(path, as_version=4), parameters)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=kernel_env())
    return nb


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def text_of(nb) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for o in outputs(nb):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif "data" in o:
            parts.append(o["data"].get("text/markdown", "") or o["data"].get("text/plain", ""))
    return "\n".join(parts)


def count(nb, mime: str) -> int:
    return sum(1 for o in outputs(nb) if mime in o.get("data", {}))


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*[:=]?\s*([-+0-9.eE]+)", text)
    assert match, f"{label!r} not printed; the notebook printed:\n{text[-3000:]}"
    return float(match.group(1))


# -- the committed files ---------------------------------------------------------------------------

def all_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert all_notebooks(), "no notebooks in notebooks/"
    for path in all_notebooks():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} carries outputs: strip them"


def test_every_notebook_has_a_parameters_cell_and_ci_parameters():
    for path in all_notebooks():
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters' expected, found {len(tagged)}"
        names = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", tagged[0].source, re.M))
        assert "MODEL" in names, f"{path.name}: its parameters cell should let the model be chosen (MODEL)"
        missing = set(CI_PARAMETERS.get(path.stem, {})) - names
        assert not missing, f"{path.name}: CI sets {sorted(missing)}, which its parameters cell does not define"
        assert path.stem in CI_PARAMETERS, f"{path.name} has no entry in CI_PARAMETERS"


# -- executing them -----------------------------------------------------------------------------------

def run(name: str):
    require_model()
    path = NOTEBOOKS / f"{name}.ipynb"
    start = time.perf_counter()
    nb = execute(path, notebook_parameters(name))
    elapsed = time.perf_counter() - start
    print(f"{name}: executed in {elapsed:.1f} s")
    errors = [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    return nb


@pytest.mark.slow
def test_live_demo():
    nb = run("00_live_demo")
    assert count(nb, WIDGET) >= 1, "the Playground widget was not displayed"
    text = text_of(nb)
    assert "mtpnb Playground" in text
    assert number_after("generated tokens:", text) > 0


@pytest.mark.slow
def test_quickstart():
    nb = run("01_quickstart")
    assert count(nb, WIDGET) >= 2, "the %%mtp token streams were not displayed"
    text = text_of(nb)
    assert "tokens/verify" in text, "no metrics line"
    assert number_after("tokens per verify at depth 3:", text) >= 1.0
    if openblas_path():  # a plain kernel: `%load_ext mtpnb` loaded it, nothing was preloaded
        assert "BLAS: OpenBLAS" in text and "loaded in-process" in text, text[-2000:]


@pytest.mark.slow
def test_why_speculative_decoding_works():
    nb = run("02_why_speculative_decoding_works")
    assert count(nb, PLOTLY) >= 3, "the roofline, verify-cost and speedup charts were not produced"
    text = text_of(nb)
    assert number_after("verify cost ratio t(4)/t(1):", text) > 0.5
    if openblas_path():  # this notebook imports mlx itself: only after mtpnb
        assert "BLAS: OpenBLAS" in text and "loaded in-process" in text, text[-2000:]
    assert "predicted" in text and "measured" in text


@pytest.mark.slow
def test_exact_sampling():
    nb = run("03_exact_sampling")
    assert count(nb, PLOTLY) >= 3
    text = text_of(nb)
    # The toy check and the real-model check must both look like samples of the same distribution.
    assert number_after("toy chi-square p-value:", text) > 1e-4
    assert number_after("AR vs MTP chi-square p-value:", text) > 1e-4
    assert abs(number_after("empirical acceptance:", text) - number_after("sum(min(p, q)):", text)) < 0.02


@pytest.mark.slow
def test_depth_and_sampling_sweeps():
    nb = run("04_depth_and_sampling_sweeps")
    assert count(nb, PLOTLY) >= 3
    assert number_after("best depth at temperature 0.0:", text_of(nb)) >= 0


@pytest.mark.slow
def test_inside_the_mtp_head():
    nb = run("05_inside_the_mtp_head")
    assert count(nb, PLOTLY) >= 1
    text = text_of(nb)
    assert number_after("head logits, by hand vs mtp_forward, max |difference|:", text) < 1e-3
    assert number_after("rolled back vs fresh prefill, max |difference|:", text) < 1e-4
    assert number_after("not rolled back vs fresh prefill, max |difference|:", text) > 1e-3


@pytest.mark.slow
def test_bring_your_own_model():
    nb = run("06_bring_your_own_model")
    text = text_of(nb)
    assert "mtp.fc.weight" in text
    assert "no MTP weights" in text
    assert "same greedy output after the round trip: True" in text


def test_every_notebook_imports_mtpnb_before_mlx():
    # `import mtpnb` loads OpenBLAS only if MLX is not loaded yet: a notebook that imports mlx first runs
    # on the reference BLAS in a plain kernel (mtpnb.blas).
    first_import = re.compile(r"^(?:import|from) (mlx|mtpnb)\b|^%load_ext (mtpnb)", re.M)
    for path in all_notebooks():
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        first = first_import.search(code)
        assert first and "mtpnb" in first.groups(), f"{path.name}: imports mlx before mtpnb"


def test_ci_parameters_name_existing_notebooks():
    names = {p.stem for p in all_notebooks()}
    assert set(CI_PARAMETERS) == names, f"CI_PARAMETERS {sorted(CI_PARAMETERS)} vs notebooks {sorted(names)}"


def test_parameters_survive_json():
    # The injected cell is Python literals: keep CI_PARAMETERS to values whose repr is valid Python.
    for params in CI_PARAMETERS.values():
        for value in params.values():
            assert eval(repr(value)) == value  # noqa: S307 (literals only)
            json.dumps(value)
