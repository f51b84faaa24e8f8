"""The widget layer without a browser: what goes over the comm (batched token messages, the final
snapshot in synced traits), cancellation, errors shown in the widget, the comparison's speedup and
the static renderings. Every widget here talks to a capturing comm instead of a kernel."""

from __future__ import annotations

import _thread
import json
import subprocess
import sys
import threading
import time

import comm
import pytest
from comm.base_comm import BaseComm

import mtpnb
from mtpnb.events import Metrics, Result
from mtpnb.runtime import runtime
from mtpnb.widgets import (Comparison, Generation, LiveCharts, Playground, TokenStream, show_comparison, show_generation,
                           speedup, stream_to_widget)
from mtpnb.widgets.charts import MAX_POINTS
from mtpnb.widgets.runner import FLUSH_INTERVAL_S
from mtpnb.widgets.token_stream import token_record

PROMPT = "def fibonacci(n):\n"
SAMPLED = dict(depth=3, temperature=1.0, seed=0)  # the random tiny model gives every kind of token so


class CapturingComm(BaseComm):
    """What a kernel would send to the front end: every message, checked to be JSON."""

    sent: list[tuple[str, str, dict]] = []

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        json.dumps(data)
        self.sent.append((self.comm_id, msg_type, data))


@pytest.fixture(autouse=True)
def captured(monkeypatch):
    """The messages sent by widgets created in the test: [(comm_id, msg_type, data)]."""
    sent: list = []
    monkeypatch.setattr(CapturingComm, "sent", sent)
    monkeypatch.setattr(comm, "create_comm", CapturingComm)
    return sent


@pytest.fixture(scope="module")
def model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3_5"))


def custom_messages(sent, widget) -> list[dict]:
    return [d["content"] for cid, kind, d in sent
            if cid == widget.comm.comm_id and kind == "comm_msg" and d.get("method") == "custom"]


def state_updates(sent, widget) -> list[dict]:
    return [d["state"] for cid, kind, d in sent
            if cid == widget.comm.comm_id and kind == "comm_msg" and d.get("method") == "update"]


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class StepClock:
    """A sink that notes when each verify step reached the widgets."""

    def __init__(self):
        self.steps: list[float] = []

    def start(self, prompt, depth):
        pass

    def event(self, event):
        if isinstance(event, mtpnb.StepEvent):
            self.steps.append(time.monotonic())

    def flush(self):
        pass

    def finish(self, result, status, error):
        pass


# -- streaming ----------------------------------------------------------------------------------------

def test_tokens_travel_in_batches_and_add_up_to_the_result(model, captured):
    view, generation = stream_to_widget(model, PROMPT, max_tokens=64, **SAMPLED)
    started = time.perf_counter()
    result = generation.wait()
    elapsed = time.perf_counter() - started
    messages = custom_messages(captured, view.stream)
    assert all(m["type"] == "tokens" for m in messages)
    streamed = [record for m in messages for record in m["tokens"]]
    assert streamed == [token_record(e) for e in result.events]
    assert {r[0] for r in streamed} >= {"accepted", "rejected", "correction", "plain"}
    assert len(messages) < len(result.events) / 2  # batched, not one message per token
    assert len(messages) <= elapsed / FLUSH_INTERVAL_S + 2
    assert messages[-1]["generated"] <= result.metrics.generated_tokens


def test_final_state_is_kept_in_synced_traits(model, captured):
    view, generation = stream_to_widget(model, PROMPT, max_tokens=40, **SAMPLED)
    result = generation.wait()
    stream = view.stream
    assert stream.status == "done" and stream.finish_reason == "length"
    assert stream.tokens == [token_record(e) for e in result.events]
    assert stream.text == result.text and stream.prompt == PROMPT
    assert stream.metrics == result.metrics.to_dict()
    assert stream.summary == result.metrics.summary()
    final = state_updates(captured, stream)[-1]  # one message carries the whole snapshot
    assert final["status"] == "done" and final["text"] == result.text
    assert final["tokens"] == stream.tokens and final["summary"] == stream.summary
    assert state_updates(captured, stream)[0]["status"] == "running"


def test_a_view_of_a_finished_result():
    result = Result(
        tokens=[1, 2], text="ab", steps=[],
        events=[mtpnb.TokenEvent(1, "a", "plain", 0, 0, 0.5), mtpnb.TokenEvent(2, "b", "plain", 1, 0, 0.25)],
        metrics=Metrics(generated_tokens=2, finish_reason="length"),
    )
    view = TokenStream.from_result(result, prompt="> ")
    assert view.status == "done" and view.text == "ab" and len(view.tokens) == 2


def test_a_front_end_that_listens_late_gets_the_batches_sent_before(captured):
    """token_stream.js, made to start listening late by anywidget's 2 s limit, asks for a replay: one
    message with every record sent so far, that the later batches extend to the whole stream."""
    view = TokenStream()
    view.start(PROMPT, 3)
    events = [mtpnb.TokenEvent(i, f"t{i}", "plain", 0, i, 0.5) for i in range(5)]

    def replay():
        view._handle_msg({"content": {"data": {"method": "custom", "content": {"type": "replay"}}}, "buffers": []})

    for e in events[:3]:
        view.event(e)
    view.flush()
    for e in events[3:]:
        view.event(e)
    replay()
    view.flush()
    first, replayed, last = custom_messages(captured, view)
    records = [token_record(e) for e in events]
    assert (first["type"], replayed["type"], last["type"]) == ("tokens", "replay", "tokens")
    assert replayed["tokens"] == first["tokens"] == records[:3] and last["tokens"] == records[3:]
    view.finish(None, "cancelled")
    replay()  # over: the synced `tokens` trait holds the records
    assert len(custom_messages(captured, view)) == 3 and view.tokens == records


# -- stopping -----------------------------------------------------------------------------------------

def test_stop_cancels_within_one_verify_step(model, captured):
    clock = StepClock()
    view = TokenStream()
    generation = Generation(model, PROMPT, dict(max_tokens=5000, **SAMPLED), [view, clock]).start()
    wait_for(lambda: len(clock.steps) >= 5)
    asked = time.monotonic()
    generation.stop()
    result = generation.wait(timeout=30)
    assert generation.status == "cancelled" and view.status == "cancelled"
    assert sum(t > asked for t in clock.steps) <= 1
    assert result.metrics.finish_reason == "cancelled" and len(result.tokens) < 5000
    assert result.text == "".join(e.text for e in result.events if e.kind != "rejected")
    assert result.metrics.generated_tokens == len(result.tokens) == len(result.steps) + result.metrics.accepted_drafts
    assert view.tokens == [token_record(e) for e in result.events]
    assert "tokens" in view.summary
    assert model.generate(PROMPT, max_tokens=4).metrics.generated_tokens == 4  # the engine is free again


def test_playground_stop_button(model):
    playground = Playground(model, max_tokens=5000, **SAMPLED)
    controls = playground.controls
    controls.generate_button.click()
    assert controls.generate_button.disabled and not controls.stop_button.disabled
    wait_for(lambda: playground.stream.status == "running" and len(playground.stream._records) > 10)
    controls.stop_button.click()
    wait_for(lambda: not controls.generate_button.disabled)
    assert playground.stream.status == "cancelled"
    assert controls.stop_button.disabled
    assert playground.result.metrics.finish_reason == "cancelled"


def test_generations_share_one_mlx_thread(model):
    # MLX leaves an OS thread behind for every thread that evaluated arrays: one for all generations
    for _ in range(3):
        stream_to_widget(model, PROMPT, max_tokens=4)[1].wait()
    assert [t.name for t in threading.enumerate()].count(runtime().name) == 1


def test_kernel_interrupt_stops_a_blocking_wait(model):
    view, generation = stream_to_widget(model, PROMPT, max_tokens=5000, **SAMPLED)
    wait_for(lambda: len(view.stream._records) > 10)
    threading.Timer(0.05, _thread.interrupt_main).start()  # what the interrupt button does
    result = generation.wait()
    assert generation.status == "cancelled" and result.metrics.finish_reason == "cancelled"


def test_one_generation_at_a_time_per_model(model):
    hold = threading.Event()  # the runtime thread waits: the first generation holds the model, not yet running
    runtime().submit(hold.wait, 30)
    first = Generation(model, PROMPT, dict(max_tokens=4), [TokenStream()]).start()
    try:
        with pytest.raises(mtpnb.MTPNBError, match="already generating"):
            Generation(model, PROMPT, dict(max_tokens=4), [TokenStream()]).start()
    finally:
        hold.set()
        first.stop()
        first.wait()


# -- errors ---------------------------------------------------------------------------------------------

def test_bad_parameters_raise_one_line_before_anything_runs(model):
    with pytest.raises(mtpnb.MTPNBError, match="depth must be"):
        stream_to_widget(model, PROMPT, depth=99)
    with pytest.raises(mtpnb.MTPNBError, match="unknown parameter 'temp'"):
        stream_to_widget(model, PROMPT, temp=1.0)


class Exploding:
    """A model whose stream fails after a few events, as a bug or a lost connection would."""

    def __init__(self, model, after: int):
        self.model, self.after = model, after
        self.name, self.has_mtp = model.name, model.has_mtp

    def stream(self, prompt, **params):
        events = self.model.stream(prompt, **params)

        def failing():
            for i, event in enumerate(events):
                if i == self.after:
                    events.close()
                    raise RuntimeError("boom")
                yield event

        return failing()


def test_an_error_while_decoding_is_shown_in_the_widget(model):
    view, generation = stream_to_widget(Exploding(model, after=12), PROMPT, max_tokens=64, **SAMPLED)
    result = generation.wait()
    stream = view.stream
    assert generation.status == "error" and stream.status == "error"
    assert stream.error.splitlines()[0] == "RuntimeError: boom"
    assert "Traceback" in stream.error  # the details, folded away in the view
    assert result is not None and 0 < len(stream.tokens) < 12  # what was decoded stays visible
    assert isinstance(generation.exception, RuntimeError)


def test_a_bad_control_value_is_shown_in_the_widget(model):
    playground = Playground(model)
    playground.controls.seed.value = "abc"
    playground.controls.generate_button.click()
    assert playground.stream.status == "error"
    assert "seed must be a whole number" in playground.stream.error
    assert not playground.controls.generate_button.disabled


def test_the_view_reflects_the_mtp_toggle(model):
    controls = Playground(model).controls
    controls.mtp.value = False
    assert controls.depth.disabled and controls.params()["depth"] == 0
    controls.mtp.value = True
    assert controls.params()["depth"] == controls.depth.value


# -- charts ----------------------------------------------------------------------------------------------

def test_live_charts_end_with_the_engine_figures(model, captured):
    charts = LiveCharts(refresh_s=0.1)
    before = len(captured)
    started = time.perf_counter()
    result = Generation(model, PROMPT, dict(max_tokens=120, **SAMPLED), [TokenStream(), charts]).start().wait()
    elapsed = time.perf_counter() - started
    fig = charts.figure
    assert list(fig.data[2].y) == pytest.approx(result.metrics.acceptance_by_position)
    assert sum(fig.data[3].y) == result.metrics.verify_calls
    assert 0 < len(fig.data[0].x) <= MAX_POINTS
    assert fig.data[1].y[-1] == pytest.approx(result.metrics.decode_tok_s, rel=0.05)
    redraws = [m for m in captured[before:] if m[0] == charts.output.comm.comm_id and "outputs" in m[2].get("state", {})]
    assert 2 <= len(redraws) <= elapsed / 0.1 + 3  # throttled, each redraw one message
    shown = redraws[-1][2]["state"]["outputs"][0]["data"]["application/vnd.plotly.v1+json"]
    assert shown["data"][2]["y"] == pytest.approx(result.metrics.acceptance_by_position)  # what the browser got
    assert "width" not in shown["layout"]  # as wide as its container
    assert shown["layout"]["height"] > 0 and "responsive" not in shown["config"]  # its own height (test_browser.py)


def test_live_charts_say_nothing_about_depth_0_before_a_run():
    subtitle = LiveCharts().figure.layout.annotations[1].text
    assert "depth 0" not in subtitle
    charts = LiveCharts()
    charts.start("x", depth=0)
    assert "no drafts at depth 0" in charts.figure.layout.annotations[1].text


# -- comparison ----------------------------------------------------------------------------------------

def test_comparison_runs_both_depths_and_computes_the_speedup(model):
    comparison = Comparison(model)
    base, mtp = comparison.run(PROMPT, depth=3, max_tokens=24).wait(timeout=60)
    assert base.metrics.depth == 0 and mtp.metrics.depth == 3
    s = comparison.speedup
    assert s["decode"] == pytest.approx(mtp.metrics.decode_tok_s / base.metrics.decode_tok_s)
    assert s["same_output"]  # greedy: speculative decoding gives the plain output exactly
    assert "depth 3 vs depth 0: decode" in comparison.verdict.value
    assert comparison.base.status == comparison.mtp.status == "done"


def test_stopping_a_comparison_skips_its_second_run(model):
    hold = threading.Event()  # the runtime thread waits, so the stop lands before the first run ends
    runtime().submit(hold.wait, 30)  # (a random model's sampled run can end by itself within a few tokens)
    comparison = Comparison(model).run(PROMPT, depth=3, max_tokens=5000, **{"temperature": 1.0})
    comparison.stop()
    hold.set()
    assert comparison.wait(timeout=30) is None and comparison.speedup is None
    assert comparison.base.status == "cancelled" and comparison.mtp.status == "idle"
    assert "Stopped" in comparison.verdict.value


def test_speedup_figures():
    def result(depth, decode, e2e, tokens):
        return Result(tokens, "", [], [], Metrics(depth=depth, decode_tok_s=decode, end_to_end_tok_s=e2e,
                                                  acceptance_rate=0.5 if depth else 0.0))

    s = speedup(result(0, 20.0, 10.0, [1, 2]), result(3, 50.0, 15.0, [1, 2]))
    assert s["decode"] == 2.5 and s["end_to_end"] == 1.5 and s["same_output"] and s["acceptance"] == 0.5
    assert speedup(result(0, 0.0, 0.0, [1]), result(3, 5.0, 5.0, [2]))["decode"] is None


def test_comparison_refuses_a_model_without_mtp(checkpoints):
    with pytest.warns(UserWarning, match="no MTP weights"):
        plain = mtpnb.load(checkpoints(family="qwen3", mtp=None))
    with pytest.raises(mtpnb.MTPNBError, match="no MTP head"):
        Comparison(plain).run(PROMPT)


# -- without a widget front end ---------------------------------------------------------------------------

def test_static_renderings_for_nbconvert_and_github(model):
    result = model.generate("<b>" + PROMPT, max_tokens=32, **SAMPLED)
    view = TokenStream.from_result(result, prompt="<b>" + PROMPT, label="depth 3")
    data, _ = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["text/plain"].startswith("[depth 3]\n<b>" + PROMPT + result.text)
    assert data["text/plain"].endswith(result.metrics.summary())
    page = data["text/html"]
    assert "&lt;b&gt;" in page and "<b>" + PROMPT not in page  # escaped
    text = page[page.index("<pre"):page.index("</pre>")]
    assert text.count("<del ") == sum(e.kind == "rejected" for e in result.events) > 0
    assert 'title="rejected draft · position' in page and "white-space:pre-wrap" in page
    assert "\x00" not in page
    view.hide_rejected = True
    page = view._repr_mimebundle_()[0]["text/html"]
    assert "<del " not in page[page.index("<pre"):]


def test_show_generation_displays_then_returns_the_result(model, monkeypatch):
    import IPython.display

    shown, updated = [], []

    class Handle:
        def update(self, obj, raw=False):
            updated.append(obj if raw else (obj, obj.status))

    def display(obj, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", display)
    result = show_generation(model, PROMPT, charts=True, max_tokens=16, **SAMPLED)
    assert result.text == model.generate(PROMPT, max_tokens=16, **SAMPLED).text
    assert isinstance(shown[0], TokenStream) and isinstance(shown[1], LiveCharts)
    # the token view re-sent with its final state; the charts replaced by the static figure (no widget left)
    assert updated == [(shown[0], "done"), shown[1].to_mimebundle()]
    assert "application/vnd.jupyter.widget-view+json" not in updated[1]


def test_show_comparison_renders_both_runs_without_a_front_end(model, monkeypatch):
    import IPython.display

    updated = []

    class Handle:
        def update(self, obj):
            updated.append(obj._repr_mimebundle_())

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: Handle())
    base, mtp = show_comparison(model, PROMPT, depth=2, max_tokens=12)
    data = updated[-1]
    assert data["text/plain"].startswith("depth 2 vs depth 0: decode")
    assert base.text in data["text/plain"] and mtp.text in data["text/plain"]
    assert data["text/html"].count("<pre") == 2


def test_import_mtpnb_stays_free_of_jupyter():
    code = ("import sys, mtpnb; assert not [m for m in ('ipywidgets', 'plotly', 'anywidget') if m in sys.modules]; "
            "from mtpnb.widgets import Playground; assert mtpnb.Playground is Playground")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
