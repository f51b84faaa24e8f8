"""The training side of the default model: corpus, tokenizer, smoke training, export vs MLX."""

import json
from pathlib import Path

import numpy as np
import pytest

from mtpnb.train.corpus import (
    HELDOUT_MODULES,
    HELDOUT_PACKAGES,
    PACKAGES,
    STDLIB,
    Deduplicator,
    _keep_package_path,
    mtpnb_closure,
    stdlib_source,
)
from mtpnb.train.tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer


def _write(root: Path, rel: str, text: str = "x = 1\n") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_stdlib_selection_is_deterministic_drops_tests_and_holds_out_bench_modules(tmp_path):
    for rel in (
        "abc.py",
        "textwrap.py",
        "json/decoder.py",
        "email/parser.py",
        "test/test_other.py",
        "test/support/helper.py",
        "idlelib/idle_test/test_x.py",
        "site-packages/pkg/mod.py",
        "encodings/cp1252.py",
        "__pycache__/abc.py",
    ):
        _write(tmp_path, rel)
    _write(tmp_path, "broken.py", "def f(:\n")
    (train, heldout), (train2, heldout2) = stdlib_source(tmp_path), stdlib_source(tmp_path)
    assert train == train2 and heldout == heldout2
    assert [f.path for f in train.files] == ["abc.py", "email/parser.py", "test/support/helper.py"]
    assert [f.path for f in heldout] == ["json/decoder.py", "textwrap.py"]
    assert train.skipped == {"tests": 2, "not UTF-8 or does not parse": 1}
    assert train.files[0].bytes == 6 and len(train.files[0].sha256) == 64


def test_package_files_leave_out_tests_and_vendored_code():
    skipped = {}
    kept = [p for p in ("pkg/core.py", "pkg/tests/test_core.py", "pkg/test_x.py", "pkg/x_test.py", "conftest.py",
                        "pkg/_vendor/six.py", "pkg/data.json", "pkg/sub/mod.py") if _keep_package_path(p, skipped)]
    assert kept == ["pkg/core.py", "pkg/sub/mod.py"]
    assert skipped == {"tests": 4, "vendored": 1}


def test_deduplicator_finds_exact_and_near_duplicates():
    base = (STDLIB / "queue.py").read_text()
    dedup = Deduplicator()
    assert dedup.seen(base) is None
    assert dedup.seen(base.replace("\n", "   \n")) == "exact"  # trailing whitespace only
    edited = base.replace("def qsize(self):", "def size(self):")
    assert dedup.seen(edited) == "near"
    assert dedup.seen((STDLIB / "bisect.py").read_text()) is None


def test_training_never_sees_the_packages_mtpnb_test_installs():
    closure = set(mtpnb_closure())
    assert {"mtpnb", "numpy", "mlx-lm", "pytest", "requests", "jinja2"} <= closure
    assert "torch" not in closure  # the train extra is not part of it
    assert set(HELDOUT_PACKAGES) <= closure
    from packaging.utils import canonicalize_name

    assert not {canonicalize_name(name) for name, _, _ in PACKAGES} & closure


def test_heldout_modules_exist_in_this_stdlib():
    for name in HELDOUT_MODULES:
        assert (STDLIB / f"{name}.py").exists() or (STDLIB / name / "__init__.py").exists(), name


def test_quality_measures_loops_and_first_function_bodies():
    from mtpnb.metrics import loops
    from mtpnb.train.quality import first_body, parses

    assert loops(list(range(8)) * 3) and not loops(list(range(8)) * 2 + list(range(7)))
    assert not loops(list(range(128)))
    header = '    def area(self):\n        """The area."""\n'
    body = "        w = self.w\n        return w * self.h\n\n    def perimeter(self):\n        retu"
    assert first_body(header, 4, body, finished=False) == header + "        w = self.w\n        return w * self.h\n\n"
    assert parses(first_body(header, 4, body, finished=False))
    cut = "        total = sum(\n            x for x in"
    assert first_body(header, 4, cut, finished=False) == header + "        total = sum(\n"
    assert not parses(first_body(header, 4, cut, finished=False))


def test_tokenizer_round_trips_python_source(tmp_path):
    texts = [(STDLIB / name).read_text() for name in ("abc.py", "bisect.py", "queue.py")]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    unseen = (STDLIB / "textwrap.py").read_text() + "\n# ünïcode, tabs\t and emoji 🐍\n"
    assert tokenizer.decode(tokenizer.encode(unseen).ids) == unseen
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1

    save_tokenizer(tokenizer, tmp_path, model_max_length=4096)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|endoftext|>" and loaded.eos_token_id == 0
    assert loaded.decode(loaded.encode(unseen)) == unseen
    messages = [{"role": "user", "content": "hi"}]
    prompt = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_think = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.train import main

    out = tmp_path_factory.mktemp("smoke") / "model"
    main(["--smoke", "--out", str(out), "--data", str(out.parent / "corpus"), "--unlikelihood-steps", "2",
          "--unlikelihood-prefix", "16", "24", "--unlikelihood-continuation", "24", "--unlikelihood-pool", "4",
          "--unlikelihood-sampled", "--own-prefixes", "function-body", "--head-data", "own"])
    return out


@pytest.mark.torch
@pytest.mark.slow
def test_smoke_training_writes_a_loadable_folder(smoke_model):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import mtpnb
    from mtpnb.train.export import load_model

    names = {p.name for p in smoke_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert {"manifest.json", "training.json"} <= names
    config = json.loads((smoke_model / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text" and config["architectures"] == ["Qwen3_5ForCausalLM"]
    assert config["mtp_num_hidden_layers"] == 1 and config["mtp_use_dedicated_embeddings"] is False
    with safe_open(smoke_model / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    mtp = sorted(k for k in keys if k.startswith("mtp."))
    assert len(mtp) == 15 and "mtp.fc.weight" in mtp and "lm_head.weight" not in keys

    training = json.loads((smoke_model / "training.json").read_text())
    assert [p["name"] for p in training["phases"]] == ["joint", "unlikelihood", "head"]
    generations = [h for h in training["history"] if "own_continuations" in h]
    assert generations and all(0 <= g["own_continuations"]["loop_rate"] <= 1 for g in generations)
    # the head phase (--head-data own) drafts on the model's own text: greedy and sampled pools in turn
    assert [g["own_continuations"]["sampling"] for g in generations if g["phase"] == "head"][:2] == ["greedy", "T=0.6"]
    # --unlikelihood-sampled: the unlikelihood phase's too (both loop rates)
    assert [g["own_continuations"]["sampling"] for g in generations if g["phase"] == "unlikelihood"] == ["greedy", "T=0.6"]
    assert training["hyperparameters"]["own_prefixes"] == "function-body"
    assert {g["own_continuations"]["prefix"] for g in generations} == {16, 24}  # both prefix lengths
    assert all(np.isfinite(p["heldout"]["loss_main"]) for p in training["phases"])
    assert "## Evaluation on the held-out text" in (smoke_model / "README.md").read_text()

    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    ours = load_model(smoke_model)
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(smoke_model, dtype=torch.float32)(ids).logits
        assert torch.allclose(ours.trunk_forward(ids)[1], hf_logits, atol=1e-5)
    assert mtpnb.load(smoke_model).has_mtp


@pytest.mark.torch
def test_a_subset_is_whole_training_files_drawn_at_random_in_corpus_order(smoke_model, tmp_path):
    from mtpnb.train.corpus import subset

    corpus = smoke_model.parent / "corpus"
    train = np.load(corpus / "train.npy")

    def files(ids):  # each file ends with <|endoftext|> (id 0)
        return [tuple(f) for f in np.split(ids, np.flatnonzero(ids == 0)[:-1] + 1)]

    record = subset(corpus, tmp_path / "a", tokens=train.size // 2, seed=1)
    kept = files(np.load(tmp_path / "a" / "train.npy"))
    remaining = iter(files(train))
    assert all(f in remaining for f in kept)  # whole files, in the corpus's order
    assert record == json.loads((tmp_path / "a" / "manifest.json").read_text())["subset"]
    assert record["files"] == len(kept) and record["of_files"] == len(files(train))
    assert train.size // 2 - max(map(len, files(train))) < record["tokens"] <= train.size // 2
    assert np.array_equal(np.load(tmp_path / "a" / "heldout.npy"), np.load(corpus / "heldout.npy"))
    assert subset(corpus, tmp_path / "b", tokens=train.size // 2, seed=1) == record
    assert np.array_equal(np.load(tmp_path / "b" / "train.npy"), np.load(tmp_path / "a" / "train.npy"))
    subset(corpus, tmp_path / "c", tokens=train.size // 2, seed=2)
    assert files(np.load(tmp_path / "c" / "train.npy")) != kept


@pytest.mark.torch
def test_interpolation_keeps_a_share_of_a_fine_tunes_change_and_the_card_says_so(smoke_model, tmp_path):
    import shutil

    from mtpnb.train.card import render_card
    from mtpnb.train.export import interpolate, read_weights, save_weights

    start = read_weights(smoke_model)
    tuned = tmp_path / "tuned"  # a fine-tune of the smoke model: every tensor moved, training.json naming its base
    shutil.copytree(smoke_model, tuned)
    save_weights({n: t + 1 for n, t in start.items()}, tuned)
    training = json.loads((smoke_model / "training.json").read_text())
    subset = {"seed": 3, "files": 2, "of_files": 9, "tokens": 1000, "of_tokens": 5000}
    (tuned / "training.json").write_text(
        json.dumps({**training, "corpus": {**training["corpus"], "subset": subset}, "base": training}))

    interpolate(tuned, smoke_model, tmp_path / "half", weight=0.5)
    half = read_weights(tmp_path / "half")
    assert all(half[n].dtype == t.dtype and torch_close(half[n], t + 0.5) for n, t in start.items())
    written = json.loads((tmp_path / "half" / "training.json").read_text())
    assert written["interpolation"] == {"weight": 0.5}
    card = render_card(written, None)
    assert "start + 0.5 x (end - start)" in card
    assert "python -m mtpnb.train.export OUT2-full OUT2 --base OUT1 --weight 0.5" in card
    assert "python -m mtpnb.train.corpus artifacts/subset2 --subset-of artifacts/corpus --tokens 1000 --seed 3" in card
    assert "--data artifacts/subset2 --out OUT2-full" in card and "--init-from OUT1" in card

    with pytest.raises(SystemExit, match="was not fine-tuned from"):
        interpolate(smoke_model, tuned, tmp_path / "wrong", weight=0.5)
    with pytest.raises(SystemExit, match="in \\(0, 1\\]"):
        interpolate(tuned, smoke_model, tmp_path / "wrong", weight=1.5)


def torch_close(a, b) -> bool:
    import torch

    tolerance = 1e-2 if a.dtype == torch.bfloat16 else 1e-6  # bfloat16 keeps 8 bits of mantissa
    return torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.torch
def test_own_continuations_take_every_prefix_length_greedy_and_sampled_in_turn():
    pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.train import OWN_SAMPLING, own_pool_plan

    both = [own_pool_plan(g, [128, 384], "both") for g in range(5)]
    assert both == [(128, {}), (128, OWN_SAMPLING), (384, {}), (384, OWN_SAMPLING), (128, {})]
    assert [own_pool_plan(g, [128, 384], "greedy") for g in range(3)] == [(128, {}), (384, {}), (128, {})]
    assert [own_pool_plan(g, [128, 384], "sampled") for g in range(3)] == [
        (128, OWN_SAMPLING), (384, OWN_SAMPLING), (128, OWN_SAMPLING)]


@pytest.mark.torch
def test_unlikelihood_marks_the_repeats_of_a_continuation_up_to_its_end():
    torch = pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.train import repeated_spans

    span = [11, 12, 13]
    prefix = span * 2  # a span the prompt repeats is not the model's loop
    continuation = [5] + span + [6] + span + [7, 0, 9, 9, 9, 9]  # eos (0), then padding that repeats
    repeated, valid = repeated_spans(torch.tensor([prefix + continuation]), len(prefix), eos=0, span=3)
    assert valid[0].tolist() == [False] * 6 + [True] * 10 + [False] * 4
    assert [i - 6 for i in torch.nonzero(repeated[0]).flatten().tolist()] == [5, 6, 7]


@pytest.mark.torch
def test_unlikelihood_can_leave_a_span_written_twice_alone():
    torch = pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.train import repeated_spans

    twice, thrice = [11, 12, 13], [21, 22, 23]
    continuation = twice + [5] + twice + [6] + thrice + [7] + thrice + [8] + thrice
    ids = torch.tensor([continuation])
    every, _ = repeated_spans(ids, 0, eos=0, span=3)
    from_third, _ = repeated_spans(ids, 0, eos=0, span=3, occurrence=3)
    assert torch.nonzero(every[0]).flatten().tolist() == [4, 5, 6, 12, 13, 14, 16, 17, 18]
    assert torch.nonzero(from_third[0]).flatten().tolist() == [16, 17, 18]


@pytest.mark.torch
def test_a_continuation_that_ends_early_is_no_loop():
    torch = pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.train import loop_rate, repeated_spans

    prefix = [3] * 4
    ended = [5, 6, 7, 0] + [0] * 28  # the end of text (0), then generate's padding with it
    looping = ([8, 9, 10, 11] * 8)[:32]  # an 8-token span 3 times and more
    ids = torch.tensor([prefix + ended, prefix + looping])
    _, valid = repeated_spans(ids, len(prefix), eos=0)
    assert loop_rate(ids, valid, len(prefix)) == 0.5


@pytest.mark.torch
@pytest.mark.parametrize("vocab_size", [300, 2000])  # a small vocabulary keeps `"""` and the line end apart
def test_own_continuations_can_start_where_a_function_body_does(vocab_size):
    pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.train import def_line_ends, function_body_starts

    source = (
        '"""A module docstring."""\n'
        'TEMPLATE = """not a function"""\n\n\n'
        'def area(r):\n    """The area of a circle of radius r."""\n    return 3.14159 * r * r\n\n\n'
        'class Shape:\n    def scaled(self, k):\n        """\n        A copy, k times larger.\n        """\n'
        '        return Shape(self.size * k)\n\n    def name(self):\n        return "shape"\n'
    )
    tokenizer = train_tokenizer([source] * 20 + [(STDLIB / "textwrap.py").read_text()], vocab_size=vocab_size)
    ids = tokenizer.encode(source).ids
    starts = function_body_starts(np.array(ids + [0] + ids[:12]), tokenizer)  # a file ending mid-signature
    bodies = [tokenizer.decode(ids[s:]).splitlines()[0] for s in starts]
    assert bodies == ["    return 3.14159 * r * r", "        return Shape(self.size * k)"]
    # after a `def` line: where a bare signature asks for its body (a docstring here, or the code)
    after_def = [tokenizer.decode(ids[s:]).splitlines()[0].strip() for s in def_line_ends(np.array(ids + [0] + ids[:12]), tokenizer)]
    assert after_def == ['"""The area of a circle of radius r."""', '"""', 'return "shape"']


@pytest.mark.torch
def test_head_attends_causally():
    torch = pytest.importorskip("torch", reason="needs the train extra (torch + transformers)")
    from mtpnb.train.model import MTPModel, build_config

    torch.manual_seed(0)
    model = MTPModel(build_config(128, hidden_size=64, num_hidden_layers=4, head_dim=32, num_attention_heads=2)).eval()
    hidden, ids = torch.randn(1, 12, 64), torch.randint(0, 128, (1, 12))
    later_changed_hidden, later_changed_ids = hidden.clone(), ids.clone()
    later_changed_hidden[:, 8:] += 1.0
    later_changed_ids[:, 8:] = (ids[:, 8:] + 1) % 128
    with torch.no_grad():
        g, _ = model.mtp_forward(hidden, ids)
        g_changed, _ = model.mtp_forward(later_changed_hidden, later_changed_ids)
    assert torch.allclose(g[:, :8], g_changed[:, :8], atol=1e-6)
    assert not torch.allclose(g[:, 8:], g_changed[:, 8:])


@pytest.mark.torch
def test_export_matches_mlx_trunk_and_head(smoke_model, tmp_path):
    """The float32 export of a small random checkpoint (norm weights away from 0, so the 1 + w
    convention shows), loaded by mtpnb on MLX: trunk and head steps 1 and 2 within 1e-4 of torch,
    on held-out text."""
    import mlx.core as mx
    import torch

    import mtpnb
    from mtpnb.train.export import export
    from mtpnb.train.model import MTPModel, build_config
    from mtpnb.train.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = build_config(
        512, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=2, linear_head_dim=32,
    )  # fmt: skip
    model = MTPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    export(model, tmp_path, smoke_model, dtype=torch.float32)
    loaded = mtpnb.load(tmp_path, dtype="float32")

    text = (STDLIB / "textwrap.py").read_text()
    ids = torch.tensor([load_tokenizer(smoke_model).encode(text).ids[:66]])
    seq = ids[:, :64]
    with torch.no_grad():
        hidden, logits = model.trunk_forward(seq)
        g1, logits1 = model.mtp_forward(hidden, ids[:, 1:65])
        g2, logits2 = model.mtp_forward(g1, ids[:, 2:66])
    mx_hidden, mx_logits = loaded.forward(mx.array(seq.numpy()))
    mx_g1, mx_logits1 = loaded.mtp_forward(mx_hidden, mx.array(ids[:, 1:65].numpy()))
    mx_g2, mx_logits2 = loaded.mtp_forward(mx_g1, mx.array(ids[:, 2:66].numpy()))
    pairs = {
        "trunk hidden": (hidden, mx_hidden),
        "trunk logits": (logits, mx_logits),
        "head step 1": (logits1, mx_logits1),
        "head step 2": (logits2, mx_logits2),
    }
    for name, (ours, theirs) in pairs.items():
        assert np.abs(np.array(theirs) - ours.numpy()).max() < 1e-4, name


@pytest.mark.torch
def test_evaluate_reports_perplexity_agreement_and_completions(smoke_model):
    from mtpnb.train.evaluate import PROMPTS, evaluate

    results = evaluate(smoke_model, max_tokens=2000, seq_len=32)
    assert results["tokens"] > 0 and np.isfinite(results["perplexity"])
    assert len(results["agree"]) == len(results["chain"]) == 3
    assert results["chain"][2] <= results["chain"][0] <= 1.0
    assert 1.0 <= results["tokens_per_verify_estimate"] <= 4.0
    assert set(results["completions"]) == set(PROMPTS)
    assert all(text.startswith(prompt) for prompt, text in results["completions"].items())
