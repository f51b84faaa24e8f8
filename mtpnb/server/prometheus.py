"""`/metrics` in Prometheus' text format (or OpenMetrics), with the names vLLM uses, so that the
dashboards and alerts written for a vLLM server carry over by changing the prefix `vllm:` to `mtpnb:`.

    mtpnb:num_requests_running / num_requests_waiting               gauges: the worker and its queue
    mtpnb:prompt_tokens_total / generation_tokens_total             counters
    mtpnb:request_success_total{finished_reason="stop|length|abort|error"}
    mtpnb:http_errors_total{status}                                 requests refused before generating
    mtpnb:time_to_first_token_seconds                               histograms, one sample per request
    mtpnb:request_time_per_output_token_seconds
    mtpnb:request_decode_time_seconds / request_queue_time_seconds / e2e_request_latency_seconds
    mtpnb:spec_decode_num_drafts_total                              verify steps that checked drafts
    mtpnb:spec_decode_num_draft_tokens_total                        drafts proposed
    mtpnb:spec_decode_num_accepted_tokens_total                     drafts kept in the output
    mtpnb:spec_decode_num_accepted_tokens_per_pos_total{position}   ... at draft position 0, 1, ... (as vLLM)
    mtpnb:prefix_cache_queries_total / prefix_cache_hits_total      prompt tokens looked up in the prompt cache /
                                                                    found there (not prefilled), as vLLM counts
    mtpnb:prefix_cache_entries / prefix_cache_bytes                 gauges: what the prompt cache holds

Every series but http_errors carries `model_name`, as vLLM's do. Acceptance rate =
num_accepted_tokens / num_draft_tokens; mean tokens per verify = 1 + num_accepted_tokens / num_drafts.

`prometheus_client` (the `serve` extra) does the exposition and the content negotiation; without it
the JSON view still works and the Prometheus one answers a one-line error saying what to install.
"""

from __future__ import annotations

from urllib.parse import parse_qs

PREFIX = "mtpnb:"
# vLLM's buckets, so that histogram_quantile() panels read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
FINISHED = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
INSTALL = "the Prometheus format needs prometheus_client: pip install 'mtpnb[serve]' (or prometheus_client)"


def negotiate(query: str, accept: str | None) -> str | None:
    """The Accept header to render Prometheus' exposition for, or None for the JSON view.

    `?format=prometheus` (text 0.0.4) or `?format=openmetrics`, or an Accept header that asks for
    text/plain or OpenMetrics and not for JSON (what Prometheus' scraper sends). JSON otherwise: the
    view mtpnb.connect reads."""
    fmt = parse_qs(query).get("format", [""])[-1].lower()
    if fmt == "json":
        return None
    if fmt == "openmetrics":
        return "application/openmetrics-text; version=1.0.0"
    if fmt in ("prometheus", "text"):
        return "text/plain"
    if fmt:
        raise ValueError(f"unknown metrics format {fmt!r}: use json, prometheus or openmetrics")
    lowered = (accept or "").lower()
    if "application/json" in lowered or not ("text/plain" in lowered or "application/openmetrics-text" in lowered):
        return None
    return accept


class PrometheusMetrics:
    """The server's Prometheus registry (its own, not the process-wide one: several servers may
    run in one process). Fed by the worker's Stats; rendered on each scrape."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` twin of every series (vLLM turns them off too)
        self.registry = r = CollectorRegistry()
        model = ["model_name"]

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, model, buckets=buckets, registry=r)

        self.running = Gauge(PREFIX + "num_requests_running", "Requests generating now (one at a time)", model,
                             registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting in the queue", model, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", model, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated (output tokens)", model,
                                         registry=r)
        self.finished = Counter(PREFIX + "request_success", "Requests finished, by finish reason",
                                model + ["finished_reason"], registry=r)
        self.http_errors = Counter(PREFIX + "http_errors", "Requests answered with an HTTP error", ["status"],
                                   registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token (prefill)", TTFT_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request", TPOT_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Time from the first token to the last",
                                LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time spent waiting for the model", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token", LATENCY_BUCKETS)
        self.num_drafts = Counter(PREFIX + "spec_decode_num_drafts", "Verify steps that checked drafts", model,
                                  registry=r)
        self.num_draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens", "Draft tokens proposed", model,
                                        registry=r)
        self.num_accepted_tokens = Counter(PREFIX + "spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted (kept in the output)", model, registry=r)
        self.prefix_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prompt cache",
                                      model, registry=r)
        self.prefix_hits = Counter(PREFIX + "prefix_cache_hits",
                                   "Prompt tokens whose state came from the prompt cache (not prefilled)", model,
                                   registry=r)
        self.prefix_entries = Gauge(PREFIX + "prefix_cache_entries", "States held by the prompt cache", model,
                                    registry=r)
        self.prefix_bytes = Gauge(PREFIX + "prefix_cache_bytes", "Bytes held by the prompt cache", model, registry=r)
        self.accepted_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position (0 = first draft)",
                                        model + ["position"], registry=r)

    @classmethod
    def create(cls) -> "PrometheusMetrics | None":
        """None when prometheus_client is not installed."""
        try:
            return cls()
        except ImportError:
            return None

    # -- fed by the worker's Stats --------------------------------------------------------------------
    def http_error(self, status: int) -> None:
        self.http_errors.labels(str(status)).inc()

    def finish(self, model_name: str, finish_reason: str, result=None, wait_s: float = 0.0) -> None:
        """A request left the worker: finished with `result`, or cancelled / failed without one."""
        self.finished.labels(model_name, FINISHED.get(finish_reason, finish_reason)).inc()
        self.queue.labels(model_name).observe(wait_s)
        if result is None:
            return
        m = result.metrics
        self.prompt_tokens.labels(model_name).inc(m.prompt_tokens)
        self.generation_tokens.labels(model_name).inc(m.generated_tokens)
        self.ttft.labels(model_name).observe(m.ttft_s)
        decode_s = max(m.total_s - m.ttft_s, 0.0)
        self.decode.labels(model_name).observe(decode_s)
        if m.generated_tokens > 1:
            self.tpot.labels(model_name).observe(decode_s / (m.generated_tokens - 1))
        self.e2e.labels(model_name).observe(wait_s + m.total_s)
        self.prefix_queries.labels(model_name).inc(m.prompt_tokens)
        self.prefix_hits.labels(model_name).inc(m.cached_prompt_tokens)
        for position in range(m.depth):  # every position of the depth shows, zeros included
            self.accepted_per_pos.labels(model_name, str(position))
        drafted = [s for s in result.steps if s.drafted]
        if not drafted:
            return
        self.num_drafts.labels(model_name).inc(len(drafted))
        self.num_draft_tokens.labels(model_name).inc(sum(s.drafted for s in drafted))
        self.num_accepted_tokens.labels(model_name).inc(sum(s.accepted for s in drafted))
        for position in range(max(s.accepted for s in drafted)):
            self.accepted_per_pos.labels(model_name, str(position)).inc(sum(s.accepted > position for s in drafted))

    # -- a scrape -------------------------------------------------------------------------------------
    def render(self, accept: str | None, *, model_name: str, waiting: int, running: int,
               prefix_cache: dict | None = None) -> tuple[bytes, str]:
        """The exposition and its content type, in the format `accept` prefers (OpenMetrics or text 0.0.4).
        `prefix_cache`: the prompt cache's stats (None: the server runs without one)."""
        from prometheus_client.exposition import choose_encoder

        self.waiting.labels(model_name).set(waiting)
        self.running.labels(model_name).set(running)
        if prefix_cache is not None:
            self.prefix_entries.labels(model_name).set(prefix_cache["entries"])
            self.prefix_bytes.labels(model_name).set(prefix_cache["bytes"])
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
