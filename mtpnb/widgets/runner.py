"""Run one generation on the MLX runtime's thread and feed its events to widgets ("sinks").

The kernel's main thread stays free, so buttons and sliders keep working while tokens stream.
Two threads do the work:
- the MLX runtime's thread (one for the whole process, mtpnb.runtime) iterates `model.stream(...)`
  and hands every event to each sink (`sink.event`, cheap: it only queues), and checks the stop flag
  after each verify step;
- a ticker per generation calls `sink.flush()` every `interval` seconds, which is where sinks send
  their batch to the front end; after the stream ends the runtime's thread does a last flush and
  calls `sink.finish`.

A sink is any object with these four methods (TokenStream and LiveCharts are sinks):
    start(prompt: str, depth: int)   before the first event (the depth the model really decodes at)
    event(ev: TokenEvent | StepEvent) on the runtime's thread, for every event
    flush()                           on the ticker thread, then once more on the runtime's thread
    finish(result: Result | None, status: str, error: str)
                                      status: "done", "cancelled" or "error"; result is partial when
                                      cancelled or failed mid-way, None when nothing was decoded
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable

from ..errors import MTPNBError
from ..events import Done, Result, StepEvent, TokenEvent
from ..metrics import compute_metrics
from ..params import GenerationParams
from ..runtime import Task, runtime

FLUSH_INTERVAL_S = 0.04  # batch period for the token messages: well under Jupyter's message-rate limits
LOCK_WAIT_S = 1.0  # a generation that was just stopped finishes its verify step within this

log = logging.getLogger("mtpnb.widgets")

# One generation at a time per model: the engine is not re-entrant. Keyed by id(): Model is unhashable.
_model_locks: dict[int, threading.Lock] = {}
_model_locks_guard = threading.Lock()


def _model_lock(model) -> threading.Lock:
    with _model_locks_guard:
        return _model_locks.setdefault(id(model), threading.Lock())


class Generation:
    """A generation running on a background thread, feeding sinks; the handle to stop and await it.

        gen = Generation(model, "def f(x):", {"depth": 3, "max_tokens": 64}, [token_stream]).start()
        gen.stop()             # cancels after the verify step in progress
        result = gen.wait()    # the Result (partial when stopped), or None if nothing was decoded

    Bad parameters raise MTPNBError here, in the caller's thread, before anything runs.
    """

    def __init__(self, model, prompt, params: dict, sinks: Iterable, *, interval: float = FLUSH_INTERVAL_S):
        self.model = model
        self.prompt = prompt
        self.params = dict(params)
        self.sinks = list(sinks)
        self.interval = interval
        self.depth = self.params.get("depth", GenerationParams.depth) if model.has_mtp else 0
        self._stream = model.stream(prompt, **self.params)  # validates; decodes nothing until iterated
        self._stop = threading.Event()
        self._stream_ended = threading.Event()
        self._task: Task | None = None  # the decoding, on the MLX runtime's thread
        self._tick_error: BaseException | None = None
        self.result: Result | None = None
        self.status = "pending"  # then "running", and finally "done", "cancelled" or "error"
        self.error = ""  # the message shown for a failed generation
        self.exception: BaseException | None = None

    # -- the caller's side --------------------------------------------------------------------------
    def start(self) -> "Generation":
        """Start decoding on the MLX runtime's thread; raise MTPNBError if the model is busy."""
        self.claim()
        self._task = runtime().submit(self.run)
        return self

    def claim(self) -> None:
        """Take the model and start the sinks, on the caller's thread (MTPNBError if the model is
        busy); `run` then decodes. `start` does both; a Comparison runs two claimed generations
        one after the other in one task of the runtime."""
        if self.status != "pending":
            raise MTPNBError("this generation has already run: make a new Generation to run it again")
        lock = _model_lock(self.model)
        if not lock.acquire(timeout=LOCK_WAIT_S):
            raise MTPNBError(f"{self.model.name} is already generating: stop that generation first")
        self.status = "running"
        prompt_text = self.prompt if isinstance(self.prompt, str) else ""
        try:
            for sink in self.sinks:
                sink.start(prompt_text, self.depth)
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def stop(self) -> None:
        """Ask the generation to stop after the verify step in progress; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> Result | None:
        """Block until the generation has finished (or `timeout` seconds); return its Result.
        A KeyboardInterrupt (the kernel's interrupt button) stops the generation and still waits."""
        if self._task is not None:
            self._task.settle(timeout, on_interrupt=self.stop)
        return self.result

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done

    def add_done_callback(self, fn: Callable[["Generation"], None]) -> None:
        """Call fn(generation) on the runtime's thread once finished (at once if it already is);
        after start(). fn must not wait for another generation: that one would wait for fn."""
        if self._task is None:
            raise MTPNBError("start the generation before adding a done-callback")
        self._task.add_done_callback(lambda _: fn(self))

    # -- the runtime's thread ------------------------------------------------------------------------
    def run(self) -> None:
        """Decode, feeding the sinks, on this thread (the runtime's), after claim()."""
        ticker = threading.Thread(target=self._tick, name="mtpnb-flush", daemon=True)
        ticker.start()
        events: list[TokenEvent] = []
        steps: list[StepEvent] = []
        status, error = ("cancelled" if self._stop.is_set() else "done"), ""  # stopped while queued
        try:
            for event in () if self._stop.is_set() else self._stream:
                if isinstance(event, Done):
                    self.result = event.result
                    break
                if isinstance(event, StepEvent):
                    steps.append(event)
                else:
                    events.append(event)
                for sink in self.sinks:
                    sink.event(event)
                if isinstance(event, StepEvent) and self._stop.is_set():
                    status = "cancelled"
                    break
        except Exception as exc:  # shown in the widget: a dead cell must never be silent
            status, error = "error", describe_error(exc)
            self.exception = exc
        finally:
            self._stream.close()
            self._lock.release()
            self._stream_ended.set()
            ticker.join()
        if self._tick_error is not None and status != "error":
            status, error = "error", describe_error(self._tick_error)
            self.exception = self._tick_error
        if self.result is None and steps:
            self.result = partial_result(events, steps, self.depth, self._memory())
        self.status, self.error = status, error
        for sink in self.sinks:
            try:
                sink.flush()
                sink.finish(self.result, status, error)
            except Exception:
                log.exception("a widget failed to show the end of a generation")

    def _memory(self) -> tuple[float, float]:
        if getattr(self.model, "remote", False):  # a served model's memory is the server's
            return 0.0, 0.0
        from ..engine import memory_mb

        return memory_mb()

    def _tick(self) -> None:
        while not self._stream_ended.wait(self.interval):
            try:
                for sink in self.sinks:
                    sink.flush()
            except Exception as exc:
                self._tick_error = exc
                self._stop.set()
                return


def describe_error(exc: BaseException) -> str:
    """MTPNBError: its one line. Anything else: type and message, then the traceback."""
    if isinstance(exc, MTPNBError):
        return str(exc)
    head = f"{type(exc).__name__}: {exc}"
    return head + "\n" + "".join(traceback.format_exception(exc)).rstrip()


def partial_result(events: list[TokenEvent], steps: list[StepEvent], depth: int,
                   memory: tuple[float, float] = (0.0, 0.0)) -> Result:
    """The Result of a generation cut short after `steps` (the engine yields no Done when its
    stream is closed): output tokens and text from the events, metrics from the steps. The prompt
    length is unknown here and left at 0; memory (active, peak MB) is the engine's, read by the caller."""
    output = [e for e in events if e.kind != "rejected"]
    m = compute_metrics(events, steps, depth=depth, ttft_s=steps[0].elapsed_s, total_s=steps[-1].elapsed_s,
                        finish_reason="cancelled", active_memory_mb=memory[0], peak_memory_mb=memory[1])
    return Result([e.token for e in output], "".join(e.text for e in output), list(events), list(steps), m)
