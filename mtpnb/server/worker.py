"""Requests to the MLX engine: each is a task of the process's MLX runtime (mtpnb.runtime, the one
thread that runs MLX), generated one at a time in arrival order; at most `max_queue` wait. A handler
thread talks to its job through `job.out`; setting `job.cancelled` (the client went away) stops the
generation at its next event (the engine's generator is closed)."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from ..errors import MTPNBError
from ..events import Done, TokenEvent
from ..runtime import Task, runtime, wait_interruptibly
from .protocol import APIError
from .tools import call_opening, prompt_opens_thinking

log = logging.getLogger("mtpnb.server")


class Job:
    def __init__(self, request):
        self.request = request
        # ("start", prompt token ids) ("event", TokenEvent | StepEvent | Done) ("error", APIError) ("end", None)
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.ended = threading.Event()  # the worker is done with it
        self.shutdown = False  # cancelled by the server's shutdown, not by its client
        self.enqueued = time.monotonic()
        self.events = None  # the engine's stream, once it runs

    def cancel(self, *, shutdown: bool = False) -> None:
        """From any thread: the generation stops at its next check (between prefill chunks, between steps)."""
        self.shutdown = self.shutdown or shutdown
        self.cancelled.set()
        if self.events is not None:
            self.events.cancel()


class Stats:
    """Counters and the metrics of recent generations, for /metrics."""

    def __init__(self, keep: int = 100, prometheus=None):
        self.prometheus = prometheus  # a prometheus.PrometheusMetrics fed alongside, or None
        self.lock = threading.Lock()
        self.started = time.time()
        self.recent: collections.deque = collections.deque(maxlen=keep)
        self.counts = collections.Counter()

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n
        if self.prometheus is not None and name.startswith("http_"):  # "http_<status>": a refused request
            self.prometheus.http_error(int(name[len("http_"):]))

    def record(self, job: Job, metrics: dict | None, finish_reason: str, wait_s: float, result=None) -> None:
        """A request left the worker: `result` (an mtpnb.Result) when it finished, else None."""
        req = job.request
        with self.lock:
            self.counts["completed" if finish_reason not in ("cancelled", "error") else finish_reason] += 1
            if metrics:
                self.counts["generated_tokens"] += metrics.get("generated_tokens", 0)
                self.counts["prompt_tokens"] += metrics.get("prompt_tokens", 0)
                self.counts["generation_s"] += metrics.get("total_s", 0.0)
            self.recent.append({"id": req.id, "endpoint": req.endpoint, "created": req.created,
                                "stream": req.stream, "queue_wait_s": round(wait_s, 4),
                                "finish_reason": finish_reason, "metrics": metrics})
        if self.prometheus is not None:
            self.prometheus.finish(req.model, finish_reason, result, wait_s)

    def snapshot(self) -> dict:
        with self.lock:
            counts = dict(self.counts)
            counts["generation_s"] = round(counts.get("generation_s", 0.0), 3)  # summed wall time of generations
            return {"uptime_s": round(time.time() - self.started, 1), "counts": counts,
                    "recent": list(self.recent)}


class Worker:
    def __init__(self, source, *, max_queue: int, max_prompt_tokens: int | None, load_options: dict | None,
                 stats: Stats, prompt_cache_bytes: int = 0):
        self.source = source
        self.prompt_cache_bytes = prompt_cache_bytes  # 0: no prompt cache
        self.prompt_cache = None  # one mtpnb.PromptCache shared by every request, made with the model
        self.load_options = load_options or {}
        self.model = None
        self.max_prompt_tokens = max_prompt_tokens
        self.max_queue = max_queue
        self.stats = stats
        self.current: Job | None = None
        self.closing = False
        self._waiting: dict[Job, Task] = {}  # submitted, not started
        self._lock = threading.Lock()

    # -- the handler side ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy: {self.max_queue} requests are waiting "
                                    "(mtpnb serve --max-queue); retry later", code="server_busy")
            self._waiting[job] = runtime().submit(self._run, job)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def pending(self) -> int:
        return self.queued + (self.current is not None)

    def start(self) -> None:
        """Load the model (a folder / hub id / None) on the MLX thread; raises what the loader raised."""
        self.model = runtime().submit(self._load).wait()

    def _load(self):
        if self.prompt_cache_bytes:
            from ..prompt_cache import PromptCache

            self.prompt_cache = PromptCache(max_bytes=self.prompt_cache_bytes)
        if hasattr(self.source, "stream"):  # a model already loaded
            return self.source
        from ..loading import load

        return load(self.source, **self.load_options)

    def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        current = self.current
        if current is not None:
            current.cancel(shutdown=True)
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for job, task in waiting.items():  # refuse what is still waiting
            job.cancel(shutdown=True)
            if task.cancel():
                job.out.put(("error", APIError(503, "the server is shutting down", code="shutting_down")))
        if current is not None and not runtime().on_thread():
            wait_interruptibly(current.ended, timeout)

    # -- the MLX thread ---------------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        with self._lock:
            self._waiting.pop(job, None)
        if self.closing:
            job.out.put(("error", APIError(503, "the server is shutting down", code="shutting_down")))
            return
        self.current = job
        try:
            self._serve(job)
        except BaseException:  # never let one request take the worker down
            log.exception("request %s failed", job.request.id)
        finally:
            self.current = None
            job.ended.set()

    def _serve(self, job: Job) -> None:
        req = job.request
        wait_s = time.monotonic() - job.enqueued
        if job.cancelled.is_set():
            self.stats.record(job, None, "cancelled", wait_s)
            job.out.put(("end", None))
            return
        model = self.model
        try:
            if req.tools and not model.tokenizer.has_tool_calling:
                raise APIError(400, f"{model.name}'s chat template does not render tools (mlx-lm finds no tool-call "
                                    "format in it): send the request without tools", code="tools_not_supported",
                               param="tools")
            ids = prompt_ids(model, req)
            if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
                raise APIError(400, f"the prompt has {len(ids)} tokens, above this server's limit of "
                                    f"{self.max_prompt_tokens} (mtpnb serve --max-prompt-tokens)",
                               code="context_length_exceeded")
            history = None  # where the conversation so far ends: the prompt cache keeps the state there too
            if self.prompt_cache is not None:
                history = model.engine.history_length(req.prompt, ids, chat=req.chat, tools=req.tools,
                                                      reasoning=req.params.get("reasoning"))
            params = {k: v for k, v in req.params.items() if k != "reasoning"}
            events = job.events = model.stream(ids, cache=self.prompt_cache, history=history, **params)
            if job.cancelled.is_set():  # cancelled while it was being set up
                events.cancel()
        except MTPNBError as e:
            self._fail(job, APIError(400, str(e), code="invalid_parameter"), wait_s)
            return
        except APIError as e:
            self._fail(job, e, wait_s)
            return
        except Exception as e:  # noqa: BLE001
            log.exception("request %s: the engine failed to start", req.id)
            self._fail(job, APIError(500, f"the generation failed to start: {_one_line(e)}"), wait_s)
            return
        job.out.put(("start", ids))
        result, generated = None, 0
        try:
            for event in events:
                if job.cancelled.is_set():
                    break
                job.out.put(("event", event))
                generated += isinstance(event, TokenEvent) and event.kind != "rejected"
                if isinstance(event, Done):
                    result = event.result
        except Exception as e:  # noqa: BLE001
            log.exception("request %s: the generation failed", req.id)
            self._fail(job, APIError(500, f"the generation failed: {_one_line(e)}"), wait_s)
            return
        finally:
            events.close()  # cancels a generation left unfinished
        if result is None and job.shutdown:
            self._fail(job, APIError(503, f"the server is shutting down: this generation was cut after {generated} "
                                          "tokens", code="shutting_down"), wait_s)
            log.info("%s cut by the shutdown after %d tokens", req.id, generated)
            return
        if result is None:
            self.stats.record(job, None, "cancelled", wait_s)
            log.info("%s cancelled (client gone)", req.id)
        else:
            m = result.metrics
            self.stats.record(job, m.to_dict(), m.finish_reason, wait_s, result)
            log.info("%s %s: %d+%d tokens, %s, %.2fs (queued %.2fs)%s", req.id, req.endpoint, m.prompt_tokens,
                     m.generated_tokens, m.finish_reason, m.total_s, wait_s,
                     f", acceptance {m.acceptance_rate:.0%}" if m.depth and m.drafted_tokens else "")
        job.out.put(("end", None))

    def _fail(self, job: Job, error: APIError, wait_s: float) -> None:
        self.stats.record(job, None, "error", wait_s)
        job.out.put(("error", error))


def opening_of(model, req) -> str | None:
    """What the assistant's turn starts with: where tool_choice forces a call, the model's own
    call-opening marker (the model writes the rest of the call); else nothing."""
    if not req.force_tool:
        return None
    if prompt_opens_thinking(model.tokenizer, model.engine.encode(req.prompt, chat=req.chat, tools=req.tools,
                                                                  reasoning=req.params.get("reasoning"))):
        raise APIError(400, "tool_choice forces a call, which cannot follow the thinking this prompt opens: turn "
                            "reasoning (thinking) off", param="tool_choice")
    return call_opening(model.tokenizer)


def prompt_ids(model, req) -> list[int]:
    """The request's prompt as the model reads it (what a generation of it would prefill)."""
    return model.engine.encode(req.prompt, chat=req.chat, reasoning=req.params.get("reasoning"), tools=req.tools,
                               opening=opening_of(model, req))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
