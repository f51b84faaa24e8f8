"""The Binder setup, built the way repo2docker builds it, as closely as a machine without docker allows.

repo2docker, given a repository with a binder/ folder: installs binder/apt.txt with apt, creates the
Python environment (binder/runtime.txt), `pip install -r binder/requirements.txt`, runs binder/postBuild
from the repository root, and starts the notebook server. Here: a fresh venv (no system site-packages)
of this Python, the same pip commands on a clean copy of the repository, the postBuild script as it is,
and the quickstart notebook executed by that venv's plain kernel (no start script, no LD_PRELOAD:
`import mtpnb` loads the OpenBLAS that apt.txt installs; apt itself is the Makefile's job on this
machine). pip's cache is reused, so a second run is mostly installs from cached wheels.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtpnb.blas import openblas_path
from test_notebooks import CI_PARAMETERS, DEFAULT_MODEL, NOTEBOOKS, REPO, model_override

BINDER = REPO / "binder"
QUICKSTART = "01_quickstart"
INSTALL_TIMEOUT_S = 900
EXECUTE_TIMEOUT_S = 600


def test_binder_files_follow_repo2docker_conventions():
    for name in ("requirements.txt", "postBuild", "apt.txt", "runtime.txt"):
        assert (BINDER / name).is_file(), f"binder/{name} is missing"
    post_build = (BINDER / "postBuild").read_text()
    assert post_build.startswith("#!/bin/bash\n"), "postBuild needs a bash shebang"
    assert re.search(r"^set -e", post_build, re.M), "postBuild must stop at the first failing command"
    assert re.search(r"pip install \.$", post_build, re.M), "postBuild must install the repository (pip install .)"
    assert os.access(BINDER / "postBuild", os.X_OK), "binder/postBuild must be executable"
    requirements = (BINDER / "requirements.txt").read_text()
    assert re.search(r"^mlx\[cpu\]", requirements, re.M), "Linux needs the mlx[cpu] extra"
    # the package whose library `import mtpnb` loads (mtpnb.blas.OPENBLAS_CANDIDATES, openblas-pthread first)
    assert "libopenblas0-pthread" in (BINDER / "apt.txt").read_text().split()
    major, minor = map(int, re.search(r"python-(\d+)\.(\d+)", (BINDER / "runtime.txt").read_text()).groups())
    assert (major, minor) >= (3, 11), "mtpnb needs Python >= 3.11; repo2docker's default is older"


def clean_copy(destination: Path) -> Path:
    """What repo2docker sees: the repository's files (tracked, plus untracked ones not ignored), no build leftovers."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


RUNNER = r"""
import json, sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, kernel_name="python3", timeout=int(sys.argv[3]),
                        resources={"metadata": {"path": sys.argv[4]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


@pytest.mark.slow
def test_binder_build_then_quickstart(tmp_path):
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.skip("the embedded default model is absent: the Binder image would have nothing to run the quickstart on")
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the repository's files")
    nbformat = pytest.importorskip("nbformat")
    from test_notebooks import inject_parameters

    timings = {}
    start_all = time.perf_counter()
    repo = clean_copy(tmp_path / "repo")
    venv = tmp_path / "venv"
    jupyter_path = tmp_path / "jupyter"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_PRELOAD", "JUPYTER_PATH")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PYTHONNOUSERSITE="1",
               JUPYTER_PATH=str(jupyter_path / "share" / "jupyter"), JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    python = venv / "bin" / "python"

    def step(name, command, cwd=repo):
        began = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        timings[name] = time.perf_counter() - began
        print(f"binder step {name}: {timings[name]:.1f} s")
        assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    step("venv", [sys.executable, "-m", "venv", str(venv)])  # no --system-site-packages: nothing leaks in
    step("requirements.txt", [str(python), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"])
    step("postBuild", [str(repo / "binder" / "postBuild")])
    # What repo2docker's base environment brings besides the requirements: a kernel and nbclient.
    step("kernel", [str(python), "-m", "pip", "install", "-q", "ipykernel", "nbclient"])
    step("kernelspec", [str(python), "-m", "ipykernel", "install", "--prefix", str(jupyter_path), "--name", "python3"])

    # The package came from postBuild, not from the source folder: installed, default model included
    # (run from elsewhere, or the source folder on sys.path would answer instead).
    where = step("import", [str(python), "-c", "import mtpnb, pathlib; p = pathlib.Path(mtpnb.__file__).parent; "
                            "print(p); print((p / 'default_model' / 'config.json').exists())"], cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(venv)), f"mtpnb imported from {where[0]}, not from the venv"
    assert where[1] == "True", "the installed package has no default model: check package-data"
    # the JupyterLab default that makes saved notebooks keep their widgets (pyproject.toml's data files)
    assert (venv / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "mtpnb.json").is_file()

    # The quickstart, as the Binder link opens it, with a last cell that says where it ran.
    nb = nbformat.read(NOTEBOOKS / f"{QUICKSTART}.ipynb", as_version=4)
    parameters = dict(CI_PARAMETERS[QUICKSTART])
    if model_override():
        parameters["MODEL"] = model_override()
    nb = inject_parameters(nb, parameters)
    probe = nbformat.v4.new_code_cell("import sys, mtpnb\nfrom mtpnb.blas import blas_info\n"
                                      "print('kernel python:', sys.executable)\nprint('mtpnb from:', mtpnb.__file__)\n"
                                      "print(blas_info()['message'])")
    nb.cells.append(probe)
    source, executed = tmp_path / "quickstart.ipynb", tmp_path / "quickstart.out.ipynb"
    nbformat.write(nb, source)
    began = time.perf_counter()
    done = subprocess.run(
        [str(python), "-c", RUNNER, str(source), str(executed), str(EXECUTE_TIMEOUT_S), str(repo / "notebooks")],
        cwd=repo / "notebooks", env=env, capture_output=True, text=True, timeout=EXECUTE_TIMEOUT_S + 60,
    )
    timings["quickstart"] = time.perf_counter() - began
    assert done.returncode == 0, f"the quickstart failed in the Binder venv:\n{done.stderr[-4000:]}"

    result = nbformat.read(executed, as_version=4)
    errors = [o for c in result.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    printed = "".join(o.get("text", "") for o in result.cells[-1].outputs if o.output_type == "stream")
    assert f"kernel python: {venv}" in printed, printed
    assert f"mtpnb from: {venv}" in printed, printed
    if openblas_path():
        assert "loaded in-process by `import mtpnb`" in printed, printed  # a plain kernel, no LD_PRELOAD
    widgets = sum("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                  for c in result.cells if c.cell_type == "code" for o in c.outputs)
    assert widgets >= 2, "the quickstart's token streams were not displayed"
    timings["total"] = time.perf_counter() - start_all
    print("binder build and quickstart, seconds:", {k: round(v, 1) for k, v in timings.items()})
