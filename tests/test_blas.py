"""Which BLAS MLX runs on, and OpenBLAS loaded in-process by `import mtpnb`: each case in a fresh Python,
since the choice is made once per process, before MLX is imported. Nothing here asserts a speed (the
README and bench report GFLOP/s side by side)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtpnb.blas import KINDS, OPT_OUT_ENV, blas_info, openblas_path

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
INFO = "import json, mtpnb.blas as b; i = b.blas_info(); print(json.dumps({k: i[k] for k in ('kind', 'loaded_by', " \
       "'not_loaded_because', 'message')}))"


def python(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT_ENV, "MTPNB_OPENBLAS_PATH")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def info_of(code: str, **env_extra) -> dict:
    proc = python(code + "\n" + INFO, **env_extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_blas_info_names_a_known_kind():
    info = blas_info(timing=True)
    assert info["kind"] in KINDS and info["kind"] not in ("none", "unknown")
    assert isinstance(info["message"], str) and info["message"].startswith("BLAS:") and "\n" not in info["message"]
    assert set(info["gflops"]) == {"1", "64"} and all(v > 0 for v in info["gflops"].values())
    if LINUX:
        assert info["library"] and os.path.exists(info["library"])
        if info["kind"] == "reference":
            assert "remedy: " in info["message"]


needs_openblas = pytest.mark.skipif(not (LINUX and openblas_path()), reason="needs Linux with OpenBLAS installed")


@needs_openblas
def test_import_mtpnb_loads_openblas_in_process():
    info = info_of("import mtpnb")
    assert info["kind"] == "openblas" and info["loaded_by"] == "in-process", info
    assert "loaded in-process by `import mtpnb`" in info["message"]


@needs_openblas
def test_ld_preload_is_reported_as_such():
    info = info_of("import mtpnb", LD_PRELOAD=openblas_path())
    assert info["kind"] == "openblas" and info["loaded_by"] == "LD_PRELOAD", info


@pytest.mark.skipif(not LINUX, reason="the mlx-cpu wheel's reference BLAS is Linux's")
def test_opting_out_keeps_the_reference_blas_and_says_why():
    info = info_of("import mtpnb", **{OPT_OUT_ENV: "1"})
    assert info["kind"] == "reference" and info["loaded_by"] is None, info
    assert info["not_loaded_because"] == f"{OPT_OUT_ENV}=1" and f"remedy: unset {OPT_OUT_ENV}" in info["message"]


@pytest.mark.skipif(not LINUX, reason="the mlx-cpu wheel's reference BLAS is Linux's")
def test_without_openblas_the_message_says_how_to_install_it():
    info = info_of("import mtpnb", MTPNB_OPENBLAS_PATH="/no/such/libblas.so.3")
    assert info["kind"] == "reference" and info["not_loaded_because"] == "OpenBLAS is not installed", info
    assert "apt-get install libopenblas0-pthread" in info["message"]


TOO_LATE = "mtpnb: MLX was imported before mtpnb, so it runs on the slow reference BLAS"


@needs_openblas
@pytest.mark.parametrize("how", [
    "mtpnb.load(CKPT); mtpnb.load(CKPT)",  # twice: one line all the same
    "ip.run_line_magic('load_ext', 'mtpnb')",
    "ip.run_line_magic('load_ext', 'mtpnb'); ip.run_line_magic('mtp', 'load ' + CKPT)",
])
def test_mlx_imported_first_gets_one_line_saying_so(how, checkpoints):
    code = (f"import mlx.core\nimport mtpnb\nCKPT = {str(checkpoints(family='qwen3'))!r}\n"
            "from IPython.core.interactiveshell import InteractiveShell\nip = InteractiveShell.instance()\n" + how)
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("mtpnb: ")]
    assert len(lines) == 1 and lines[0].startswith(TOO_LATE) and "restart the kernel" in lines[0], proc.stderr


@needs_openblas
def test_no_line_when_openblas_is_in_use(checkpoints):
    proc = python(f"import mtpnb\nmtpnb.load({str(checkpoints(family='qwen3'))!r})")
    assert proc.returncode == 0 and "mtpnb: " not in proc.stdout + proc.stderr, proc.stderr
