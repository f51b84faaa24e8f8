"""The MLX runtime (mtpnb.runtime): one thread, a FIFO of tasks, small futures; the threading rule."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mtpnb.runtime import Runtime


def test_tasks_run_in_order_on_one_thread_and_report_their_outcome():
    rt = Runtime(name="test-runtime")
    seen = []
    gate = threading.Event()
    first = rt.submit(lambda: gate.wait(5) and seen.append(threading.current_thread().name) or "first")
    second = rt.submit(lambda: seen.append(threading.current_thread().name))
    skipped = rt.submit(seen.append, "never")
    assert skipped.cancel() and skipped.cancelled and skipped.done and skipped.wait() is None
    with pytest.raises(TimeoutError):
        second.wait(0.05)
    gate.set()
    assert first.wait(5) == "first" and second.wait(5) is None
    assert seen == ["test-runtime", "test-runtime"]
    assert not first.cancel()  # too late: it ran
    failing = rt.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.wait(5)
    called = []
    failing.add_done_callback(called.append)  # already done: at once
    assert called == [failing]


def test_iterate_hands_items_over_and_closes_the_source_when_the_consumer_stops():
    rt = Runtime(name="test-runtime-iterate")
    closed = threading.Event()
    threads = set()

    def source():
        try:
            for i in range(1000):
                threads.add(threading.current_thread().name)
                yield i
        finally:
            closed.set()

    items = rt.iterate(source())
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed.wait(5) and threads == {"test-runtime-iterate"}

    def broken():
        yield 1
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        list(rt.iterate(broken()))


def test_generations_from_threads_run_on_the_mlx_thread_and_the_process_exits_cleanly(checkpoints):
    # Issue 15: generating on threads other than the main one made processes abort at exit (134).
    code = textwrap.dedent(f"""
        import threading, mtpnb
        from mtpnb.runtime import runtime
        model = mtpnb.load({str(checkpoints(family="qwen3_5"))!r})
        results, names = [], set()
        def work(seed):
            for event in model.stream("hello", max_tokens=6, temperature=0.8, seed=seed):
                names.add(threading.current_thread().name)
                if isinstance(event, mtpnb.Done):
                    results.append(event.result.tokens)
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert len(results) == 4 and all(len(r) for r in results), results
        solo = model.generate("hello", max_tokens=6, temperature=0.8, seed=0).tokens
        assert solo in results  # a thread's seeded generation is the main thread's
        print("ok")
    """)
    for _ in range(2):  # the abort came in about a third of the runs
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
        assert time.monotonic() - started < 120
