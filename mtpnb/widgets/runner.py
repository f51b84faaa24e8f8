"""Run one generation on a background thread and feed its events to widgets ("sinks").

The kernel's main thread stays free, so buttons and sliders keep working while tokens stream.
Two threads do the work:
- the decode thread (one for the whole process, see _DecodeThread) iterates `model.stream(...)` and
  hands every event to each sink (`sink.event`, cheap: it only queues), and checks the stop flag
  after each verify step;
- a ticker per generation calls `sink.flush()` every `interval` seconds, which is where sinks send
  their batch to the front end; after the stream ends the decode thread does a last flush and calls
  `sink.finish`.

A sink is any object with these four methods (TokenStream and LiveCharts are sinks):
    start(prompt: str, depth: int)   before the first event (the depth the model really decodes at)
    event(ev: TokenEvent | StepEvent) on the decode thread, for every event
    flush()                           on the ticker thread, then once more on the decode thread
    finish(result: Result | None, status: str, error: str)
                                      status: "done", "cancelled" or "error"; result is partial when
                                      cancelled or failed mid-way, None when nothing was decoded
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterable

import mlx.core as mx

from ..engine import GenerationParams
from ..errors import MTPNBError
from ..events import Done, Metrics, Result, StepEvent, TokenEvent

FLUSH_INTERVAL_S = 0.04  # batch period for the token messages: well under Jupyter's message-rate limits
LOCK_WAIT_S = 1.0  # a generation that was just stopped finishes its verify step within this

log = logging.getLogger("mtpnb.widgets")

class _DecodeThread:
    """The one thread that decodes for the widgets, for the life of the process. MLX gives every
    thread that evaluates arrays a stream with an OS thread of its own that outlives it, and the
    exit of such a thread while the interpreter shuts down can abort the process (MLX's
    thread-local destructors take the GIL): a single long-lived daemon thread avoids both."""

    def __init__(self):
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        """Run job() on the decode thread, after the jobs submitted before it."""
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mtpnb-decode", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:
                log.exception("a decode job failed")


_decode_thread = _DecodeThread()

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
        self._finished = threading.Event()
        self._callbacks: list[Callable[[Generation], None]] = []
        self._callbacks_lock = threading.Lock()
        self._tick_error: BaseException | None = None
        self.result: Result | None = None
        self.status = "pending"  # then "running", and finally "done", "cancelled" or "error"
        self.error = ""  # the message shown for a failed generation
        self.exception: BaseException | None = None

    # -- the caller's side --------------------------------------------------------------------------
    def start(self) -> "Generation":
        """Start decoding on a background thread; raise MTPNBError if the model is busy."""
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
        _decode_thread.submit(lambda: self._work(lock))
        return self

    def stop(self) -> None:
        """Ask the generation to stop after the verify step in progress; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> Result | None:
        """Block until the generation has finished (or `timeout` seconds); return its Result.
        A KeyboardInterrupt (the kernel's interrupt button) stops the generation and still waits."""
        try:
            wait_interruptibly(self._finished, timeout)
        except KeyboardInterrupt:
            self.stop()
            self._finished.wait()
        return self.result

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def add_done_callback(self, fn: Callable[["Generation"], None]) -> None:
        """Call fn(generation) on the decode thread once finished (at once if it already is).
        fn must not wait for another generation: that one would wait for fn."""
        with self._callbacks_lock:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self)

    # -- the decode thread --------------------------------------------------------------------------
    def _work(self, lock: threading.Lock) -> None:
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
            lock.release()
            self._stream_ended.set()
            ticker.join()
        if self._tick_error is not None and status != "error":
            status, error = "error", describe_error(self._tick_error)
            self.exception = self._tick_error
        if self.result is None and steps:
            self.result = partial_result(events, steps, self.depth)
        self.status, self.error = status, error
        for sink in self.sinks:
            try:
                sink.flush()
                sink.finish(self.result, status, error)
            except Exception:
                log.exception("a widget failed to show the end of a generation")
        with self._callbacks_lock:
            self._finished.set()
        for fn in self._callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("a generation's done-callback failed")

    def _tick(self) -> None:
        while not self._stream_ended.wait(self.interval):
            try:
                for sink in self.sinks:
                    sink.flush()
            except Exception as exc:
                self._tick_error = exc
                self._stop.set()
                return


def wait_interruptibly(event: threading.Event, timeout: float | None) -> None:
    """event.wait(timeout) in short slices, so that a KeyboardInterrupt always gets through."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not event.is_set():
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if left <= 0:
            return
        event.wait(left)


def describe_error(exc: BaseException) -> str:
    """MTPNBError: its one line. Anything else: type and message, then the traceback."""
    if isinstance(exc, MTPNBError):
        return str(exc)
    head = f"{type(exc).__name__}: {exc}"
    return head + "\n" + "".join(traceback.format_exception(exc)).rstrip()


def partial_result(events: list[TokenEvent], steps: list[StepEvent], depth: int) -> Result:
    """The Result of a generation cut short after `steps` (the engine yields no Done when its
    stream is closed): output tokens and text from the events, metrics from the verify steps.
    The prompt length is unknown here and left at 0; memory is read now (its peak was reset when
    the generation started)."""
    output = [e for e in events if e.kind != "rejected"]
    verify = steps[1:]  # step 0 is the prefill's token
    ttft, total = steps[0].elapsed_s, steps[-1].elapsed_s
    generated = steps[-1].generated
    reached = [0] * depth
    accepted_at = [0] * depth
    for s in verify:
        for j in range(min(s.accepted + 1, s.drafted)):
            reached[j] += 1
            accepted_at[j] += j < s.accepted
    m = Metrics(depth=depth, generated_tokens=generated, ttft_s=ttft, total_s=total, finish_reason="cancelled")
    if generated > 1 and total > ttft:
        m.decode_tok_s = (generated - 1) / (total - ttft)
    m.end_to_end_tok_s = generated / total if total > 0 else 0.0
    m.verify_calls = len(verify)
    m.drafted_tokens = sum(s.drafted for s in verify)
    m.accepted_drafts = sum(s.accepted for s in verify)
    m.rejected_drafts = m.drafted_tokens - m.accepted_drafts
    m.correction_tokens = sum(e.kind == "correction" for e in events)
    m.bonus_tokens = sum(e.kind == "bonus" for e in events)
    m.acceptance_rate = m.accepted_drafts / m.drafted_tokens if m.drafted_tokens else 0.0
    m.acceptance_by_position = [a / r if r else 0.0 for a, r in zip(accepted_at, reached)]
    m.mean_tokens_per_verify = sum(s.emitted for s in verify) / len(verify) if verify else 0.0
    m.draft_s = sum(s.draft_s for s in verify)
    m.verify_s = sum(s.verify_s for s in verify)
    m.active_memory_mb = mx.get_active_memory() / 2**20
    m.peak_memory_mb = mx.get_peak_memory() / 2**20
    return Result([e.token for e in output], "".join(e.text for e in output), list(events), list(steps), m)
