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
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).with_name("browser_notebook.ipynb")
LAB_OVERRIDES = ROOT / "jupyter-config" / "lab" / "settings" / "overrides.d" / "mtpnb.json"
ARTIFACTS = ROOT / "artifacts"
ALL_CELLS_QUEUED = ("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                    ".every(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))")
# A plotly chart that rendered its data has drawn traces (lines, bars); a blank one only its default axes.
PLOTTED_TRACES = "el => el.querySelectorAll('.scatterlayer .trace path.js-line, .barlayer .point path').length"
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
    # The defaults an installed mtpnb gives JupyterLab (a wheel's data file, the Makefile's copy for an editable
    # install; tests/test_wheel.py checks it is installed): here from the source tree, whatever this venv holds.
    overrides = work / "app-settings" / "overrides.d"
    overrides.mkdir(parents=True)
    shutil.copy(LAB_OVERRIDES, overrides)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         f"--LabApp.app_settings_dir={work / 'app-settings'}",
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
    """Run > Run All Cells once the kernel is idle (JupyterLab and Notebook 7 both label the
    toolbar's kernel indicator so), and again if some cell was not queued: the front end may start
    a kernel, replace it at once, and drop what was sent to the first."""
    for _ in range(3):
        page.get_by_text("Kernel status: Idle").first.wait_for(state="attached", timeout=60_000)
        page.wait_for_timeout(1000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:  # every code cell queued ([*]) or run ([n])
            page.wait_for_function(ALL_CELLS_QUEUED, timeout=20_000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError("the notebook's cells did not run")


def _shut_down_kernels(url: str, token: str) -> None:
    """End every session of the server (and its kernel), as closing the notebook and its kernel would."""
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions", headers=headers), timeout=30) as r:
        sessions = json.load(r)
    for session in sessions:
        request = urllib.request.Request(f"{url}/api/sessions/{session['id']}", headers=headers, method="DELETE")
        urllib.request.urlopen(request, timeout=60).close()


def _check_token_stream(page, stream, expected: str) -> None:
    """A finished TokenStream view: coloured tokens of several kinds, legend, toggle, titles,
    metrics line, and the engine's text."""
    stream.locator(".mtp-status", has_text="done").wait_for(timeout=120_000)
    tokens = stream.locator(".mtp-out .mtp-tok")
    kinds = set(tokens.evaluate_all("spans => spans.map(s => s.classList[1].replace('mtp-tok-', ''))"))
    assert len(kinds) >= 2, kinds
    colours = tokens.evaluate_all(
        "spans => [...new Set(spans.map(s => getComputedStyle(s).backgroundColor + getComputedStyle(s).color))]")
    assert len(colours) >= 2, colours  # the kinds really look different
    assert stream.locator(".mtp-legend .mtp-legend-item").count() == 5
    assert stream.locator(".mtp-toggle input[type=checkbox]").count() == 1
    assert all("step" in t for t in tokens.evaluate_all("spans => spans.map(s => s.title)"))
    assert "tok/s" in stream.locator(".mtp-summary").inner_text()
    assert _shown_text(stream) == expected
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)


def _is_widget_error(text: str) -> bool:
    return "model not found" in text or "Failed to initialize model" in text


def _check_reopened(page, front_end: str, expected: str) -> None:
    """A notebook saved after its run, opened with no cell run: show_generation's view and the Playground,
    its Compare verdict and its live chart (an Output widget's plotly output: drawn, with its height and its
    traces) come back from the widget state saved with the notebook."""
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    reopened = page.locator(".mtp-stream").first
    reopened.locator(".mtp-status", has_text="done").wait_for(timeout=60_000)
    assert _shown_text(reopened) == expected
    playground = page.locator(".jp-OutputArea-output").filter(has=page.locator("textarea"))
    playground.locator(".mtp-verdict", has_text="depth 3 vs depth 0").wait_for(state="attached", timeout=30_000)
    live_chart = playground.locator(".widget-output .js-plotly-plot")
    live_chart.wait_for(state="attached", timeout=30_000)
    page.wait_for_function(f"el => ({PLOTTED_TRACES})(el) > 0", arg=live_chart.element_handle(), timeout=30_000)
    page.wait_for_timeout(500)  # the front end resizes a plot it has just shown: what was 0 px high came after
    # the chart's box holds the plotted figure (its svg is positioned absolutely: it does not give the box a height)
    box, figure = live_chart.evaluate("el => [el.offsetHeight, el.querySelector('.main-svg').getBoundingClientRect().height]")
    assert box > 0 and box == figure, (box, figure)
    # ipywidgets' "no kernel" icon: on each control, not on the boxes that only lay them out (token_stream.css)
    icons = playground.evaluate("""out => [...out.querySelectorAll('.jupyter-widgets-disconnected')]
        .filter(view => getComputedStyle(view, '::before').display !== 'none')
        .map(view => view.matches('.widget-box, .widget-output') ? 'box' : view.className)""")
    assert "box" not in icons and any("widget-button" in icon for icon in icons), icons
    suffix = "" if front_end == "jupyterlab" else f"-{front_end}"
    page.screenshot(path=str(ARTIFACTS / f"{front_end}-reopened.png"), full_page=True)
    playground.screenshot(path=str(ARTIFACTS / f"playground-reopened{suffix}.png"))
    broken = page.locator(".jp-CodeCell", has=page.get_by_text("Error displaying widget"))
    assert broken.count() == 0, broken.locator(".jp-InputArea").all_inner_texts()
    # show_generation's charts: a plain plotly output since the run ended (drawn, or as its saved PNG where
    # the notebook is not trusted)
    charts = page.locator(".jp-CodeCell", has_text="show_generation(model")
    charts.locator(".jp-RenderedPlotly :is(.main-svg, img.plot-img)").first.wait_for(timeout=30_000)


@contextmanager
def _chromium_page(name: str):
    """A page of Debian's chromium; on failure a screenshot goes to artifacts/NAME-failure.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        console = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        try:
            yield page
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
            print(f"{name} failed; the browser console's last errors and warnings:", *console[-15:], sep="\n  ")
            raise
        finally:
            browser.close()


def test_jupyterlab_streams_tokens_plays_and_compares(lab):
    url, token, work = lab
    with _chromium_page("jupyterlab") as page:
        page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        _run_all_cells(page)

        # show_generation's view, with its charts
        expected = _expected_text(work)
        streams = page.locator(".mtp-stream")
        first = streams.nth(0)
        _check_token_stream(page, first, expected)

        # the Playground: press Generate, the same parameters give the same text
        playground = page.locator(".jp-OutputArea-output").filter(has=page.locator("textarea"))
        playground.get_by_role("button", name="Generate").click()
        _check_token_stream(page, streams.nth(1), expected)
        assert playground.locator(".js-plotly-plot").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-light.png"), full_page=True)
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

        # saved, then reopened without running: every widget drawn from the state saved with the notebook,
        # in JupyterLab and then in Notebook 7
        page.keyboard.press("Control+s")
        page.wait_for_function("!document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=30_000)
        widget_errors = []
        page.on("console", lambda m: widget_errors.append(m.text) if _is_widget_error(m.text) else None)
        page.on("pageerror", lambda e: widget_errors.append(str(e)) if _is_widget_error(str(e)) else None)
        for front_end, route in [("jupyterlab", "lab/workspaces/reopened/tree"), ("notebook7", "notebooks")]:
            _shut_down_kernels(url, token)
            page.goto(f"{url}/{route}/{NOTEBOOK.name}?token={token}")
            _check_reopened(page, front_end, expected)
        assert not widget_errors, widget_errors


def test_notebook7_streams_tokens(lab):
    pytest.importorskip("notebook", reason="Notebook 7 is not installed (pip install notebook)")
    url, token, work = lab
    name = "browser_notebook_nb7.ipynb"  # a copy: its own kernel, not the JupyterLab test's
    shutil.copy(NOTEBOOK, work / name)
    with _chromium_page("notebook7") as page:
        page.goto(f"{url}/notebooks/{name}?token={token}")
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        _run_all_cells(page)
        _check_token_stream(page, page.locator(".mtp-stream").first, _expected_text(work))
        page.locator(".mtp-stream").first.screenshot(path=str(ARTIFACTS / "notebook7-token-stream.png"))


# anywidget (0.11) rejects a model's initialisation 2 s after the model is created (AbortSignal.timeout(2000)) and
# then drops every message the kernel sends that model. This makes the 2 s end at once: every TokenStream front
# end misses its window, deterministically, as a slow one does on a busy CPU.
ANYWIDGET_GIVES_UP_AT_ONCE = """
const timeout = AbortSignal.timeout.bind(AbortSignal);
AbortSignal.timeout = (ms) => timeout(ms === 2000 ? 0 : ms);
"""


def test_token_streams_render_after_anywidget_gave_up_waiting(lab):
    """A TokenStream whose front end initialised after anywidget's 2 s (its model created, the kernel's trait
    updates and token messages sent, before this module ran) still shows the whole stream: show_generation's
    view and both Compare panes end "done" with the engine's tokens. Before, they stayed "ready" and empty
    while the verdict reported both runs' rates."""
    url, token, work = lab
    name = "browser_notebook_late.ipynb"  # a copy: its own kernel, in a workspace of its own
    shutil.copy(NOTEBOOK, work / name)
    _shut_down_kernels(url, token)
    with _chromium_page("late-init") as page:
        gave_up = []
        page.on("pageerror", lambda e: gave_up.append(e) if "Failed to initialize model" in str(e) else None)
        page.add_init_script(ANYWIDGET_GIVES_UP_AT_ONCE)
        page.goto(f"{url}/lab/workspaces/late/tree/{name}?token={token}")
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        _run_all_cells(page)
        first = page.locator(".mtp-stream").first
        first.locator(".mtp-status", has_text="done").wait_for(timeout=120_000)
        expected = _expected_text(work)
        assert _shown_text(first) == expected
        assert gave_up, "anywidget did not give up waiting: this test tested nothing"

        playground = page.locator(".jp-OutputArea-output").filter(has=page.locator("textarea"))
        playground.get_by_role("button", name="Compare with depth 0").click()
        playground.locator(".mtp-verdict", has_text="depth 3 vs depth 0").wait_for(timeout=180_000)
        panes = playground.locator(".mtp-stream:visible")
        panes.locator(".mtp-status", has_text="done").nth(1).wait_for(timeout=30_000)
        assert panes.locator(".mtp-label").all_inner_texts() == ["depth 0 (plain decoding)", "depth 3 (MTP)"]
        assert panes.nth(0).locator(".mtp-out .mtp-tok").count() > 0
        assert _shown_text(panes.nth(1)) == expected  # the notebook's parameters, as show_generation's
        page.screenshot(path=str(ARTIFACTS / "late-init.png"), full_page=True)


# -- under CPU load ------------------------------------------------------------------------------------------
LIVE_DEMO = ROOT / "notebooks" / "00_live_demo.ipynb"
# As many busy processes as this machine's cores: the front end gets a slow, contended CPU.
BUSY_LOOPS = int(os.environ.get("MTPNB_BUSY_LOOPS", "2"))


@contextmanager
def _busy_cpu(n: int = BUSY_LOOPS):
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def _live_demo_copy(work: Path, name: str) -> None:
    nb = json.loads(LIVE_DEMO.read_text())
    index = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c["metadata"].get("tags", []))
    nb["cells"].insert(index + 1, {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
                                   "execution_count": None, "outputs": [], "id": "injected-parameters",
                                   "source": "AUTORUN = True\nMAX_TOKENS = 32"})
    (work / name).write_text(json.dumps(nb))


def _live_demo_renders(page, url: str, token: str, work: Path, name: str) -> dict:
    """Run the live demo (it generates once by itself), then Compare; what rendered, as
    {"chart_traces": n, "stream": status, "panes": [(status, tokens), ...]}. Each run opens its notebook
    in a workspace of its own (a reopened workspace would bring back the earlier runs' notebooks, unrun)
    after the earlier runs' kernels are shut down."""
    _live_demo_copy(work, name)
    _shut_down_kernels(url, token)
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?token={token}")
    page.locator(".jp-Notebook").wait_for(timeout=90_000)
    playground = page.locator(".jp-OutputArea-output").filter(has=page.locator("textarea"))
    for _ in range(3):  # on a loaded machine the front end may replace a slow-starting kernel, dropping the queue
        _run_all_cells(page)
        try:
            playground.wait_for(timeout=180_000)
            break
        except sync_api.TimeoutError:
            if page.locator(".jp-CodeCell .jp-InputPrompt", has_text="[*]").count():
                raise
    stream = playground.locator(".mtp-stream").first
    stream.locator(".mtp-status", has_text="done").wait_for(timeout=240_000)
    chart = playground.locator(".js-plotly-plot").first
    chart.wait_for(timeout=60_000)
    page.wait_for_function(f"() => ({PLOTTED_TRACES})(document.querySelector('.js-plotly-plot')) > 0",
                           timeout=30_000)
    seen = {"chart_traces": chart.evaluate(PLOTTED_TRACES), "stream": stream.locator(".mtp-status").inner_text()}
    playground.get_by_role("button", name="Compare with depth 0").click()
    playground.locator(".mtp-verdict", has_text="depth 3 vs depth 0").wait_for(timeout=300_000)
    panes = playground.locator(".mtp-stream:visible")
    panes.locator(".mtp-status", has_text="done").nth(1).wait_for(timeout=30_000)
    seen["panes"] = [(panes.nth(i).locator(".mtp-status").inner_text(),
                      panes.nth(i).locator(".mtp-out .mtp-tok").count()) for i in range(panes.count())]
    seen["depth0_toggle_visible"] = panes.nth(0).locator(".mtp-toggle").is_visible()
    return seen


LOADED_RUNS = int(os.environ.get("MTPNB_LOADED_RUNS", "1"))


@pytest.mark.skipif(LOADED_RUNS < 1, reason="MTPNB_LOADED_RUNS=0")
def test_live_demo_renders_while_the_cpu_is_busy(lab):
    """The live demo's chart and both Compare panes render (not blank, not stuck at "ready") while two
    busy loops load the CPU: anywidget gives a model 2 s to initialise, and a slow front end used to miss
    it. One run by default, on the server the tests above have warmed up; MTPNB_LOADED_RUNS=N runs it N
    times, each a fresh notebook and kernel. Measured 2026-12-02 on 2 cores with the two busy loops and
    nothing else (`MTPNB_LOADED_RUNS=10 pytest tests/test_browser.py -k "jupyterlab_streams or live_demo"`):
    10 of 10 runs rendered fully."""
    url, token, work = lab
    runs = LOADED_RUNS
    failures, console = [], []
    with _busy_cpu(), _chromium_page("live-demo-loaded") as page:
        page.on("console", lambda m: console.append(m.text) if m.type in ("error", "warning") else None)
        for i in range(runs):
            try:
                seen = _live_demo_renders(page, url, token, work, f"live_demo_loaded_{i}.ipynb")
            except (sync_api.TimeoutError, AssertionError) as e:
                page.screenshot(path=str(ARTIFACTS / f"live-demo-loaded-{i}-failure.png"), full_page=True)
                failures.append(f"run {i}: {str(e).splitlines()[0]}")
                print(f"loaded run {i} failed: {str(e).splitlines()[0]}; browser console:", *console[-12:], sep="\n  ")
                continue
            page.screenshot(path=str(ARTIFACTS / f"live-demo-loaded-{i}.png"), full_page=True)
            print(f"loaded run {i}: {seen}")
            ok = (seen["chart_traces"] > 0 and seen["stream"].startswith("done") and len(seen["panes"]) == 2
                  and all(status.startswith("done") and tokens > 0 for status, tokens in seen["panes"]))
            if not ok or seen["depth0_toggle_visible"]:
                failures.append(f"run {i}: {seen}")
    print(f"live demo under load: {runs - len(failures)} of {runs} runs rendered fully")
    assert not failures, failures
