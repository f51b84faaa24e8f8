"""mtpnb from a wheel, not from the source tree: the wheel is built, installed into a fresh venv outside the
repository, and its `mtpnb` command finds the tutorial notebooks (`lab`), describes the machine and the
embedded model (`info`), and generates. The kernel sources must be in the wheel too.

What this proves: the wheel carries everything the package reads at run time (package data, the notebooks
as data files, the console script) and works without the source tree. What it does not: dependency
resolution from an index: the heavy dependencies already installed for this Python (MLX, plotly, JupyterLab)
are reused by putting its site-packages folders on the venv's path (a .pth file of plain paths, so that the
.pth files *there*, an editable install of mtpnb among them, are not run), and the wheel is installed with
--no-deps.
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp / "dist").glob("mtpnb-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=120)
    python = tmp / "venv" / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=outside_env())
    assert install.returncode == 0, install.stderr
    # then (so that pip does not see this Python's mtpnb as already installed) the reused dependencies
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    reused = dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib"))
    (Path(site) / "reuse_installed_dependencies.pth").write_text("\n".join(reused) + "\n")
    return tmp, wheel, python


def outside_env() -> dict:
    """This environment less what points into the source tree (PYTHONPATH) or changes the BLAS."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD", "MTPNB_NO_OPENBLAS")}


def run(venv, *argv, timeout=300):
    tmp, _, python = venv
    return subprocess.run([str(python.parent / argv[0]), *argv[1:]], cwd=tmp, env=outside_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_wheel_carries_the_notebooks_and_the_kernel_sources(venv):
    names = zipfile.ZipFile(venv[1]).namelist()
    notebooks = {Path(n).name for n in names if n.endswith(".ipynb")}
    assert notebooks == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert {"mtpnb/kernel_sources/qmv_verify_cuda.cuh", "mtpnb/kernel_sources/qmv_verify_metal.metal",
            "mtpnb/widgets/token_stream.js", "mtpnb/default_model/model.safetensors"} <= set(names)
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)


def test_the_wheel_makes_jupyterlab_save_widget_state(venv):
    # JupyterLab reads <prefix>/share/jupyter/lab/settings/overrides.d/*.json as defaults for that prefix
    installed = venv[0] / "venv" / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "mtpnb.json"
    assert json.loads(installed.read_text()) == {"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}


def test_the_installed_package_is_the_wheel_not_the_source_tree(venv):
    proc = run(venv, "python", "-c", "import mtpnb, mtpnb.kernels as k; print(mtpnb.__file__); "
               "print((k.kernels_dir() / 'qmv_verify_cuda.cuh').is_file())")
    assert proc.returncode == 0, proc.stderr
    where, found = proc.stdout.split()
    assert Path(where).is_relative_to(venv[0] / "venv") and found == "True"


def test_lab_finds_the_installed_notebooks(venv):
    proc = run(venv, "mtpnb", "lab", "--no-browser", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    share = venv[0] / "venv" / "share" / "mtpnb" / "notebooks"
    assert f"--ServerApp.root_dir={share}" in proc.stdout and proc.stdout.rstrip().endswith("00_live_demo.ipynb")


def test_info_and_a_generation_from_the_wheel(venv):
    info = run(venv, "mtpnb", "info")
    assert info.returncode == 0 and "mtpnb-default" in info.stdout and "\nBLAS: " in info.stdout, info.stderr
    out = run(venv, "mtpnb", "generate", "--max-tokens", "12", "--depth", "2", "--no-color", "def add(a, b):")
    assert out.returncode == 0 and out.stdout.strip() and "\n12 tokens | TTFT " in out.stderr, out.stderr
