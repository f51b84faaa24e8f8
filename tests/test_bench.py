"""The benchmark tool: a quick run's report is well formed (JSON and HTML), and the cost-model arithmetic.
Nothing here asserts a speed."""

import json
import math
import warnings

import pytest

import mtpnb
from mtpnb import bench
from mtpnb.blas import KINDS
from mtpnb.events import StepEvent
from mtpnb.loading import DEFAULT_MODEL_DIR
from mtpnb.metrics import acceptance_counts

TOP_LEVEL = {
    "schema": str, "created": str, "depth0_vs_mlx_lm": dict, "depth0_vs_mlx_lm_detail": dict, "model": dict, "platform": dict, "settings": dict,
    "cost_model": dict, "phases_doc": dict, "results": list, "peers": dict, "notes": list,
}
NULLABLE_NUMBERS = ("best_speedup_greedy", "best_speedup_sampled", "best_fraction_of_bound_greedy",
                    "best_fraction_of_bound_sampled", "best_speedup_non_looping_greedy",
                    "best_speedup_non_looping_sampled")
ROW = {"engine": str, "depth": int, "temperature": float, "decode_tok_s": (float, type(None)),
       "decode_tok_s_repeats": list, "end_to_end_tok_s": (float, type(None)), "ttft_ms": (float, type(None)),
       "generated_tokens": int, "runs": int, "peak_memory_mb": (float, int), "loop_share": (float, int),
       "speedup_non_looping": (float, type(None)), "non_looping_runs": int}
MTPNB_ROW = {"tokens_per_verify": (float, type(None)), "acceptance_by_position": list, "speedup": (float, type(None)),
             "bound": (float, type(None)), "fraction_of_bound": (float, type(None)), "phases": (dict, type(None))}
PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, item):\n"]


@pytest.fixture(scope="module")
def quick_report(checkpoints, tmp_path_factory):
    """`python -m mtpnb.bench MODEL --quick --json --html` on a tiny checkpoint, through main()."""
    out = tmp_path_factory.mktemp("bench")
    prompt_files = []
    for i, text in enumerate(PROMPTS):
        prompt_files += ["--prompt-file", str(out / f"p{i}.py")]
        (out / f"p{i}.py").write_text(text)
    argv = [str(checkpoints(family="qwen3_5", head="echo")), "--quick", "--json", str(out / "r.json"),
            "--html", str(out / "r.html"), "--max-tokens", "6", "--depths", "0,1,2", *prompt_files, "--quiet"]
    assert bench.main(argv) == 0
    return json.loads((out / "r.json").read_text()), (out / "r.html").read_text()


def test_quick_report_is_well_formed(quick_report):
    data, _ = quick_report
    for key, kind in TOP_LEVEL.items():
        assert isinstance(data[key], kind), key
    for key in NULLABLE_NUMBERS:
        assert key in data and (data[key] is None or isinstance(data[key], float)), key
    assert isinstance(data["best_speedup_greedy"], float) and isinstance(data["best_speedup_sampled"], float)
    assert data["best_depth_greedy"] in (1, 2) and data["best_depth_sampled"] in (1, 2)
    for label in ("greedy", "sampled"):  # 6 tokens cannot hold an 8-token span 3 times: no run loops
        assert data[f"best_runs_non_looping_{label}"] == [2, 2]  # quick: 2 prompts x 1 repeat
        assert data[f"best_speedup_non_looping_{label}"] == pytest.approx(data[f"best_speedup_{label}"])
    assert data["schema"] == bench.SCHEMA
    assert data["settings"]["depths"] == [0, 1, 2] and data["settings"]["temperatures"] == [0.0, 0.6]
    assert data["platform"]["blas"]["kind"] in KINDS

    rows = data["results"]
    assert {(r["engine"], r["depth"], r["temperature"]) for r in rows} == {
        (e, d, t) for t in (0.0, 0.6) for e, d in [("mlx-lm", 0), ("mtpnb", 0), ("mtpnb", 1), ("mtpnb", 2)]}
    for r in rows:
        for key, kind in ROW.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["generated_tokens"] > 0 and r["decode_tok_s"] > 0
        assert 0 <= r["loop_share"] <= 1 and 0 <= r["non_looping_runs"] <= r["runs"]
        if r["engine"] == "mtpnb":
            for key, kind in MTPNB_ROW.items():
                assert isinstance(r[key], kind), (key, r[key])
            assert len(r["acceptance_by_position"]) == r["depth"]
            assert all(0 <= a <= 1 for a in r["acceptance_by_position"])
            assert 1 <= r["tokens_per_verify"] <= r["depth"] + 1
            assert set(r["phases"]["ms_per_token"]) == set(bench.PHASES)
            if r["depth"] == 0:
                assert r["speedup"] == pytest.approx(1.0) and r["bound"] == pytest.approx(1.0)

    cost = data["cost_model"]
    assert len(cost["verify_ms"]) == len(cost["verify_ratio"]) == 3  # M = 1 .. max depth + 1
    assert cost["verify_ratio"][0] == pytest.approx(1.0)
    assert set(cost["draft_ratio"]) == {"greedy", "T=0.6"}
    assert all(len(v) == 3 for v in cost["accept_ms"].values())
    assert data["peers"]["mlx_lm_speculative"]["applicable"] is False
    assert set(data["depth0_vs_mlx_lm"]) == set(data["depth0_vs_mlx_lm_detail"]) == {"0.0", "0.6"}
    for t, detail in data["depth0_vs_mlx_lm_detail"].items():
        assert detail["ratio"] == data["depth0_vs_mlx_lm"][t]
        assert len(detail["pairs"]) == 2  # quick: 2 prompts x 1 repeat, each an adjacent pair of runs
        assert detail["verdict"] == "undecided"  # too few pairs to say


def test_quick_report_html_is_standalone(quick_report):
    _, text = quick_report
    # (booleans first: a failing `in` on a 4 MB string would print all of it)
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    external = "<script src=" in text or "https://cdn.plot.ly/plotly" in text
    assert not external  # plotly.js is inline: no CDN
    assert text.count("Plotly.newPlot") == 5
    headline = "Best speedup over depth 0" in text and "BLAS:" in text
    assert headline


def test_report_object_and_summary(hybrid_model):
    report = bench.run_bench(hybrid_model, prompts=PROMPTS[:1], depths=(1,), temperatures=(0.0,), max_tokens=4,
                             repeats=1, warmup=0, cost_repeats=1, peers=False, phases=False)
    assert report.best_speedup_sampled is None and isinstance(report.best_speedup_greedy, float)
    assert [r["depth"] for r in report.rows("mtpnb")] == [0, 1]
    assert "decode" in report.summary() and "BenchReport" in repr(report)
    json.loads(report.to_json())


def test_code_prompts_end_before_a_function_body():
    prompts = bench.code_prompts(4, modules=bench.heldout_modules())
    assert len(prompts) == 4
    assert prompts == bench.code_prompts(4, modules=bench.heldout_modules())  # deterministic
    for p in prompts:
        if not p["name"].startswith("fallback:"):
            last = p["text"].splitlines()[-1]
            assert p["text"].endswith(":\n") and last.split("#")[0].rstrip().endswith(":"), p["name"]
            assert 300 < len(p["text"]) <= 1000
    assert [p["name"] for p in bench.code_prompts(2, stdlib="/nonexistent")] == ["fallback:fib", "fallback:lru"]


def test_parity_verdicts():
    """The depth-0 / mlx-lm verdict follows the interval: met, missed, or not separable from the goal."""
    met = bench.parity([1.01, 0.99, 1.02, 1.00, 0.98, 1.03, 1.00, 0.99])
    assert met["verdict"] == "met" and met["interval"][0] >= 0.97 and met["ratio"] == pytest.approx(1.0)
    missed = bench.parity([0.90, 0.91, 0.92, 0.89, 0.93, 0.90])
    assert missed["verdict"] == "missed" and missed["interval"][1] < 0.97
    noisy = bench.parity([0.85, 1.10, 0.92, 1.05, 0.88, 1.02])
    assert noisy["verdict"] == "undecided" and noisy["interval"][0] < 0.97 <= noisy["interval"][1]
    assert noisy == bench.parity([0.85, 1.10, 0.92, 1.05, 0.88, 1.02])  # seeded: reproducible
    assert bench.parity([]) == {}
    assert bench.parity([1.01, 1.02])["verdict"] == "undecided"  # two pairs: no verdict either way


# -- the cost model's arithmetic ------------------------------------------------------------------------
def test_speedup_bound_arithmetic():
    # E = 2.5 tokens per verify, t_verify(4)/t_1 = 1.75, a draft step 0.2 t_1, depth 3
    assert bench.speedup_bound(2.5, 1.75, 0.2, 3) == pytest.approx(2.5 / (1.75 + 0.6))
    assert bench.speedup_bound(1.0, 1.0, 0.0, 0) == 1.0  # depth 0 against itself
    # a free verify and free drafts: the bound is the tokens per verify
    assert bench.speedup_bound(3.2, 1.0, 0.0, 4) == pytest.approx(3.2)
    # linear verify cost (reference BLAS): even perfect acceptance gains nothing
    assert bench.speedup_bound(4.0, 4.0, 0.1, 3) < 1.0
    assert math.isnan(bench.speedup_bound(1.0, 0.0, 0.0, 0))
    # the first draft step at 0.2 t_1, the two after it (one C call at greedy) at 0.05 t_1 each
    assert bench.speedup_bound(2.5, 1.75, 0.2, 3, 0.05) == pytest.approx(2.5 / (1.75 + 0.2 + 0.1))


def test_tokens_per_verify_and_acceptance_counts():
    assert bench.expected_tokens_per_verify([]) == 1.0
    assert bench.expected_tokens_per_verify([0.8, 0.5]) == pytest.approx(1 + 0.8 + 0.4)
    assert bench.expected_tokens_per_verify([1.0, 1.0, 1.0]) == 4.0
    steps = [StepEvent(0, 0, 0, 1, 0, 0, 0, 1)]  # the prefill step is not a verify
    steps += [StepEvent(i + 1, 3, a, a + 1, 0, 0, 0, 0) for i, a in enumerate([0, 1, 3, 2])]
    reached, accepted = acceptance_counts(steps, 3)
    assert reached == [4, 3, 2] and accepted == [3, 2, 1]
    assert bench.median([3, None, 1, float("nan"), 2]) == 2 and bench.median([]) is None


def _run(tokens: int, decode_s: float, looping: bool) -> dict:
    return {"tokens": tokens + 1, "decode_s": decode_s, "loops": looping}


def test_speedup_on_completions_that_do_not_loop_pairs_the_same_prompts():
    # two repeats of three prompts; prompt 1 loops at depth 2 (and runs fast), prompt 2 loops at depth 0
    depth2 = [[_run(100, 1.0, False), _run(100, 0.2, True), _run(100, 1.0, False)]] * 2
    depth0 = [[_run(100, 2.0, False), _run(100, 2.0, False), _run(100, 1.0, True)]] * 2
    figures = bench.non_looping_speedup(depth2, depth0)
    assert figures == {"speedup_non_looping": pytest.approx(2.0), "non_looping_runs": 2}  # prompt 0 only
    every_one_loops = [[_run(100, 1.0, True)]]
    assert bench.non_looping_speedup(every_one_loops, every_one_loops)["speedup_non_looping"] is None


def test_a_model_that_loops_far_more_than_the_other_gets_a_note():
    def rows(share):
        return [{"engine": "mtpnb", "depth": d, "temperature": t, "loop_share": share, "runs": 6}
                for d in (0, 3) for t in (0.0, 0.6)]

    notes = bench.loop_notes("new", rows(0.0), "old", rows(1.0))
    assert len(notes) == 2 and all("so old's speedup there is largely its loops'" in n for n in notes)
    assert bench.loop_notes("new", rows(0.1), "old", rows(0.2)) == []


def test_compare_alternates_two_models_in_one_run_and_reports_both(checkpoints, tmp_path, capsys):
    # a byte-level random model against the default model: the same prompt text, each model's own tokens
    first, second = checkpoints(family="qwen3_5", head="echo"), DEFAULT_MODEL_DIR
    (tmp_path / "p.py").write_text(PROMPTS[0])
    argv = [str(first), "--compare", str(second), "--quick", "--max-tokens", "6", "--depths", "0,1",
            "--prompt-file", str(tmp_path / "p.py"), "--json", str(tmp_path / "r.json"), "--quiet", "--no-peers",
            "--html", str(tmp_path / "r.html")]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    page = (tmp_path / "r.html").read_text()
    shows_both = f"Alternated in the same run with {data['compare']['model']['name']}" in page
    assert shows_both and page.count("no-loop speedup") == 2  # the compared model's table too
    compared = data["compare"]
    assert compared["model"]["path"] != data["model"]["path"]
    assert compared["prompt_tokens"] == [len(mtpnb.load().engine.encode(PROMPTS[0]))]
    assert compared["prompt_tokens"] != [p["tokens"] for p in data["settings"]["prompts"]]
    assert any("tokenize the prompts differently" in n for n in data["notes"])
    assert {(r["depth"], r["temperature"]) for r in compared["results"]} == {(d, t) for d in (0, 1) for t in (0.0, 0.6)}
    for r in compared["results"]:  # a decode rate needs a second token (a random model may end at once)
        assert r["generated_tokens"] > 0 and (r["decode_tok_s"] > 0 if r["generated_tokens"] > 1 else r["decode_tok_s"] is None)
    assert isinstance(compared["best_speedup_greedy"], float) and compared["cost_model"]["t1_ms"] > 0

    no_head = checkpoints(family="qwen3_5", mtp=None)
    with warnings.catch_warnings(record=True) as caught:  # the one line below, not the loader's warning too
        warnings.simplefilter("always")
        assert bench.main([str(first), "--compare", str(no_head), "--quick", "--quiet",
                           "--prompt-file", str(tmp_path / "p.py")]) == 2
    assert not caught
    assert capsys.readouterr().err == f"mtpnb bench: --compare needs a model with an MTP head; {no_head.name} has none\n"
