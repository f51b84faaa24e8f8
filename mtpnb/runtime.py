"""The MLX runtime: one long-lived thread that runs the process's MLX work, in submission order.

    task = runtime().submit(model.generate, "def f(x):", max_tokens=64)
    task.wait()          # the result (or the exception the work raised); task.cancel() skips it if not started

Why one thread. MLX gives every thread that evaluates arrays a stream of its own, backed by an OS
thread that outlives it, and tearing such streams down while the interpreter exits can abort the
process ("terminate called without an active exception", exit 134). A single long-lived thread
has one such stream for the life of the process, and frees it at exit (`mx.clear_streams` on that
thread, from an atexit hook) before the interpreter goes away. It also makes the threading rule
for a `Model` simple (see mtpnb.model.Model): the widgets, the server and any code that wants a
generation off the main thread submit it here, so generations never overlap on one model.

Nothing here imports MLX until the thread has MLX work to clean up: a notebook that only talks to a
remote server uses the runtime (the widgets do) without MLX installed.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("mtpnb.runtime")
EXIT_WAIT_S = 5.0  # how long the exit hook waits for the work in progress before freeing the streams


class Task:
    """Work submitted to the runtime, and its outcome: a small future."""

    def __init__(self, fn: Callable, args: tuple = (), kwargs: dict | None = None):
        self._call = (fn, args, kwargs or {})
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[Task], None]] = []
        self.state = "pending"  # then "running" and "done", or "cancelled" if cancelled before it ran
        self._result: Any = None
        self._exception: BaseException | None = None

    def cancel(self) -> bool:
        """Skip the work if it has not started; True if it will not run."""
        with self._lock:
            if self.state != "pending":
                return self.state == "cancelled"
            self.state = "cancelled"
        self._finish()
        return True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self.state == "cancelled"

    def wait(self, timeout: float | None = None) -> Any:
        """The work's return value (re-raising its exception); None if it was cancelled.
        Waits in short slices so that a KeyboardInterrupt always gets through; TimeoutError after
        `timeout` seconds."""
        if not wait_interruptibly(self._done, timeout):
            raise TimeoutError(f"the task did not finish within {timeout} s")
        if self._exception is not None:
            raise self._exception
        return self._result

    def settle(self, timeout: float | None = None, *, on_interrupt: Callable[[], None] | None = None) -> None:
        """Wait until the work has ended (or `timeout` seconds), whatever its outcome. A KeyboardInterrupt
        (a notebook's interrupt button) calls on_interrupt() (a stop), then still waits for the end."""
        try:
            wait_interruptibly(self._done, timeout)
        except KeyboardInterrupt:
            if on_interrupt is not None:
                on_interrupt()
            wait_interruptibly(self._done, None)

    def add_done_callback(self, fn: Callable[["Task"], None]) -> None:
        """Call fn(task) once it is done: on the runtime thread, or at once if it already is.
        fn must not wait for a later task: that one would wait for fn."""
        with self._lock:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self)

    def _run(self) -> None:
        with self._lock:
            if self.state != "pending":
                return
            self.state = "running"
        fn, args, kwargs = self._call
        try:
            self._result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self._exception = e
        self.state = "done"
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("a task's done-callback failed")


class Runtime:
    """The thread (started on the first submit) and its FIFO of tasks."""

    def __init__(self, name: str = "mtpnb-mlx"):
        self.name = name
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def submit(self, fn: Callable, *args, **kwargs) -> Task:
        """Run fn(*args, **kwargs) on the runtime thread after the tasks submitted before it."""
        task = Task(fn, args, kwargs)
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
        self._tasks.put(task)
        return task

    def run(self, fn: Callable, *args, **kwargs) -> Any:
        """fn's result, computed on the runtime thread (directly when called from it)."""
        if self.on_thread():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).wait()

    def iterate(self, items: Iterator) -> Iterator:
        """Iterate `items` (a generator doing MLX work) on the runtime thread, yielding its items here
        as they come. Closing the returned iterator closes `items` after the item in progress."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        closed = threading.Event()

        def pump() -> None:
            try:
                for item in items:
                    out.put((True, item))
                    if closed.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - re-raised on the consumer's side
                out.put((False, e))
                return
            finally:
                items.close()
            out.put((False, None))

        task = self.submit(pump)
        try:
            while True:
                ok, item = out.get()
                if not ok:
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            closed.set()
            task.cancel()

    def on_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            task._run()

    def _shutdown(self) -> None:
        """At exit: let the work in progress end, then free this thread's MLX streams on it."""
        if "mlx.core" not in sys.modules or self._thread is None or not self._thread.is_alive():
            return
        import mlx.core as mx

        cleanup = self.submit(mx.clear_streams)
        self._tasks.put(None)
        try:
            cleanup.wait(EXIT_WAIT_S)
        except Exception:  # noqa: BLE001 - nothing more to do at exit
            pass


def wait_interruptibly(event: threading.Event, timeout: float | None) -> bool:
    """event.wait(timeout) in short slices, so that a KeyboardInterrupt always gets through; whether
    the event is set."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not event.is_set():
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if left <= 0:
            return False
        event.wait(left)
    return True


_runtime = Runtime()
# Registered at import, before the hooks of what uses the runtime (atexit runs the last registered
# first): a server's close() cancels its generation before the streams are freed.
atexit.register(_runtime._shutdown)


def runtime() -> Runtime:
    """The process's MLX runtime."""
    return _runtime
