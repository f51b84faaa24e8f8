"""The widgets in a real browser: a JupyterLab server on 127.0.0.1 runs tests/browser_notebook.ipynb,
Playwright drives Debian's chromium (/usr/bin/chromium, never a downloaded browser), and the test
checks the rendered DOM against the engine's own result. Screenshots go to artifacts/.

Needs: apt-get install chromium; pip install playwright jupyterlab (no `playwright install`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).with_name("browser_notebook.ipynb")
ARTIFACTS = ROOT / "artifacts"
SETTINGS = {
    "@jupyterlab/notebook-extension:tracker": {"autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server in a temp dir holding a copy of the notebook; yields (url, token, dir)."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name, sub in [("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                      ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTER_CONFIG_DIR", "config")]:
        env[name] = str(work / sub)
    for plugin, settings in SETTINGS.items():  # no kernel dialog, no news prompt: nothing to click away
        path = work / "settings" / f"{plugin.replace(':', '/')}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--allow-root", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=work, env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (work / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, token, work
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _notebook_parameters() -> dict:
    """PROMPT, PARAMS and CHECKPOINT from the notebook's `parameters` cell."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    scope: dict = {}
    exec("".join(cell["source"]), scope)
    return scope


def _expected_text(work: Path) -> str:
    """What the engine itself generates for the notebook's prompt and parameters."""
    import mtpnb
    from mtpnb.loading import DEFAULT_MODEL_DIR
    from mtpnb.widgets.token_stream import _VISIBLE

    p = _notebook_parameters()
    source = None if (DEFAULT_MODEL_DIR / "config.json").exists() else work / p["CHECKPOINT"]
    result = mtpnb.load(source).generate(p["PROMPT"], **p["PARAMS"])
    return result.text.translate(_VISIBLE)  # the widget shows control characters as their pictures


def _shown_text(stream) -> str:
    """The output a TokenStream view shows: its token spans, rejected drafts left out."""
    return stream.locator(".mtp-out").evaluate(
        "out => [...out.children].filter(s => !s.classList.contains('mtp-tok-rejected'))"
        ".map(s => s.textContent).join('')"
    )


def _run_all_cells(page) -> None:
    """Run > Run All Cells once the kernel is idle; again if no cell started (a click that lands
    while the kernel connection is still settling can be dropped)."""
    for _ in range(3):
        page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=60_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            page.locator(".jp-InputPrompt", has_text="[1]").first.wait_for(timeout=15_000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError("the notebook's cells did not run")


def test_notebook_streams_tokens_in_chromium(lab):
    url, token, work = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.locator(".jp-Notebook").wait_for(timeout=60_000)
            _run_all_cells(page)

            # show_generation's view: the stream finishes, with coloured tokens, legend and charts
            streams = page.locator(".mtp-stream")
            first = streams.nth(0)
            first.locator(".mtp-status", has_text="done").wait_for(timeout=120_000)
            kinds = set(first.locator(".mtp-out .mtp-tok").evaluate_all(
                "spans => spans.map(s => s.classList[1].replace('mtp-tok-', ''))"))
            assert len(kinds) >= 2, kinds
            colours = first.locator(".mtp-out .mtp-tok").evaluate_all(
                "spans => [...new Set(spans.map(s => getComputedStyle(s).backgroundColor + getComputedStyle(s).color))]")
            assert len(colours) >= 2, colours  # the kinds really look different
            assert first.locator(".mtp-legend .mtp-legend-item").count() == 5
            assert first.locator(".mtp-toggle input[type=checkbox]").count() == 1
            titles = first.locator(".mtp-out .mtp-tok").evaluate_all("spans => spans.map(s => s.title)")
            assert all("step" in t for t in titles)
            assert "tok/s" in first.locator(".mtp-summary").inner_text()
            page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
            expected = _expected_text(work)
            assert _shown_text(first) == expected

            # the Playground: press Generate, the same parameters give the same text
            playground = page.locator(".jp-OutputArea-output").filter(has=page.locator("textarea"))
            playground.get_by_role("button", name="Generate").click()
            second = streams.nth(1)
            second.locator(".mtp-status", has_text="done").wait_for(timeout=120_000)
            assert _shown_text(second) == expected
            assert playground.locator(".js-plotly-plot").count() >= 1

            page.screenshot(path=str(ARTIFACTS / "browser-light.png"), full_page=True)
            playground.screenshot(path=str(ARTIFACTS / "playground-light.png"))

            # Compare: depth 0 and depth 3 side by side, with the speedup
            playground.get_by_role("button", name="Compare with depth 0").click()
            verdict = playground.locator(".mtp-verdict", has_text="depth 3 vs depth 0")
            verdict.wait_for(timeout=180_000)
            assert "decode" in verdict.inner_text() and "×" in verdict.inner_text()
            panes = playground.locator(".mtp-stream:visible")
            assert panes.count() == 2
            assert panes.locator(".mtp-status", has_text="done").count() == 2
            playground.screenshot(path=str(ARTIFACTS / "comparison-light.png"))
            playground.get_by_role("tab", name="Stream").click()

            # hiding rejected drafts leaves only the output
            first.locator(".mtp-toggle input").check()
            assert first.locator(".mtp-out .mtp-tok-rejected:visible").count() == 0
            assert first.locator(".mtp-out .mtp-tok:visible").count() > 0

            # the dark theme (Settings > Theme > JupyterLab Dark)
            page.get_by_role("menuitem", name="Settings", exact=True).click()
            page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel", has_text="Theme")).first.click()
            page.locator(".lm-Menu-itemLabel").get_by_text("JupyterLab Dark", exact=True).click()
            page.wait_for_function("document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
            page.wait_for_timeout(500)
            playground.screenshot(path=str(ARTIFACTS / "playground-dark.png"))
            first.screenshot(path=str(ARTIFACTS / "token-stream-dark.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
