"""Text fidelity (issue 18): the text mtpnb returns is exactly the tokenizer's decoding of the tokens it
generated, checked against the tokenizer's own `decode`:

    completion   prompt + text == decode(prompt_ids + generated_ids)
    chat         decode(template_ids) + text == decode(template_ids + generated_ids)

The tokenizers here (the default model's, and the byte-level one of the test checkpoints) are byte-level
BPE without clean-up: their normalisation is the identity, decode(encode(prompt)) == prompt, which
`expected_text` asserts too. A stop string cuts the text where it starts. The pieces (TokenEvent.text of
the output tokens, as they are yielded; server stream chunks; mtpnb.connect's events) add up to the text;
a rejected draft shows decode([its token]). An incomplete character is never shown as a replacement
character unless the generation ends inside it (then the text ends as decode's does).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtpnb
from mtpnb import Done, TokenEvent
from mtpnb.detokenizer import CONTEXT_TOKENS, Detokenizer
from mtpnb.fixtures import write_byte_tokenizer

REPLACEMENT = "\ufffd"
ISSUE_PROMPTS = ["def fibonacci(n):\n    ", "def is_prime(n):\n    ", "x = 1\ny ="]
NEVER = "\x00never\x00"  # a second stop string that does not occur
# Prompt material: code, every kind of whitespace a prompt ends in, multi-byte characters (CJK, emoji and
# an emoji sequence with a zero-width joiner, combining marks), a special token.
FRAGMENTS = ["def f(x):", "return", "x = 1", "if n < 2:", "# note", "print(", ")", "'", '"', ".", ",", " ", "  ",
             "\t", "\n", "\n    ", "\n\n", "中文", "明", "한국어", "😀", "🐍", "👩‍💻", "e\u0301", "a\u0300\u0302", "ñ", "ü",
             "<|im_end|>"]
# Random (prompt, settings) cases per run: 2,000 (the default model's prefill is slow on a CPU: it gets few).
TINY_CASES, DEFAULT_MODEL_CASES, SERVER_CASES, CONNECT_CASES = 1920, 25, 35, 20
ENDINGS = ["", " ", "  ", "\n", "\n    ", "    ", "\t", "\n\n"]
TEXT = st.text(st.characters(codec="utf-8"), max_size=4)
PROMPTS = st.builds(lambda parts, end: "".join(parts) + end,
                    st.lists(st.one_of(st.sampled_from(FRAGMENTS), TEXT), min_size=1, max_size=6),
                    st.sampled_from(ENDINGS)).filter(bool)


def generation_settings(max_tokens: int, chat: bool = True):
    """Random engine settings: every depth, greedy and sampled, seeds, short generations."""
    optional = {"top_p": st.sampled_from([0.5, 0.9]), "top_k": st.sampled_from([5, 50])}
    if chat:
        optional["chat"] = st.just(True)
    return st.fixed_dictionaries({"depth": st.integers(0, 4), "temperature": st.sampled_from([0.0, 0.0, 0.7, 1.0, 1.5]),
                                  "seed": st.integers(0, 2**16), "max_tokens": st.integers(1, max_tokens)},
                                 optional=optional)


def cases(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the rule, from the tokenizer's decode -----------------------------------------------------------------------------
def expected_text(tokenizer, context: list[int], generated: list[int], stop=(), prompt: str | None = None) -> str:
    """What the text must be: the decoding of the generated ids after the context's (the prompt's ids,
    or the rendered chat template's), cut where the first stop string starts (stop strings are matched
    in the generated text only)."""
    before = tokenizer.decode(context)
    if prompt is not None:
        assert before == prompt  # these tokenizers' normalisation is the identity
    full = tokenizer.decode(context + generated)
    assert full.startswith(before)
    text = full[len(before):]
    if stop:
        assert stop[0] in text  # the stop string fired
        text = text[: text.index(stop[0])]
    return text


def check_stream(model, prompt, **params):
    """Run model.stream; check the text, the pieces as yielded, rejected drafts; return the Result."""
    tokenizer = model.tokenizer
    shown, result = [], None
    for event in model.stream(prompt, **params):
        if isinstance(event, TokenEvent):
            shown.append((event.kind, event.token, event.text))  # the text as the consumer sees it now
        elif isinstance(event, Done):
            result = event.result
    chat = params.get("chat", False)
    context = model.engine.encode(prompt, chat=chat)
    text = expected_text(tokenizer, context, result.tokens, params.get("stop", ()), None if chat else prompt)
    assert result.text == text
    assert "".join(piece for kind, _, piece in shown if kind != "rejected") == text
    assert [token for kind, token, _ in shown if kind != "rejected"] == result.tokens
    assert all(piece == tokenizer.decode([token]) for kind, token, piece in shown if kind == "rejected")
    if not chat and not params.get("stop"):
        assert prompt + result.text == tokenizer.decode(context + result.tokens)  # the rule, as the issue says it
    return result


def check_case(model, prompt, params, data):
    """One random case; half of them with a stop string drawn from the text it generates without one,
    so that it fires (and the stopped generation is the same up to there)."""
    full = check_stream(model, prompt, **params)
    if not full.text or not data.draw(st.booleans(), label="with a stop string"):
        return
    start = data.draw(st.integers(0, len(full.text) - 1), label="stop start")
    stop = full.text[start: start + data.draw(st.integers(1, 4), label="stop length")]
    stops = data.draw(st.sampled_from([(stop,), (stop, NEVER)]), label="stop")
    cut = check_stream(model, prompt, **params, stop=stops)
    assert cut.tokens == full.tokens[: len(cut.tokens)]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.metrics.finish_reason == "stop"


# -- models and tokenizers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model():
    return mtpnb.load()


@pytest.fixture(scope="module")
def tiny(checkpoints):
    """The test checkpoints' byte-level tokenizer (one token per byte: every multi-byte character is
    split) on the smallest, fastest trunk: its random output has invalid UTF-8 and special tokens too."""
    return mtpnb.load(checkpoints(family="llama", num_layers=1, hidden_size=32))


def tokenizer_in(folder: Path, **config):
    from transformers import AutoTokenizer

    if config:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(folder)
    return tokenizer_in(folder)


@pytest.fixture(scope="module")
def cleanup_tokenizer(tmp_path_factory):
    """The byte tokenizer with clean-up of spaces ("a ." decodes to "a."): text may change after it
    decoded, so the detokenizer holds back a space that the next tokens may remove."""
    folder = tmp_path_factory.mktemp("cleanup")
    write_byte_tokenizer(folder)
    return tokenizer_in(folder, clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A SentencePiece-style tokenizer (Metaspace: '▁' for spaces, the decoder drops the space at the
    start of what it decodes), with byte fallback for what it has not seen."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False,
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(["def fibonacci(n): return n if n < 2 else fibonacci(n - 1)", "hello world " * 3,
                             "the quick brown fox jumps over the lazy dog"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


# -- the Detokenizer alone -------------------------------------------------------------------------------------------
def pieces_of(tokenizer, context, generated) -> list[str]:
    detokenizer = Detokenizer(tokenizer, context=context)
    return [detokenizer.add(t) for t in generated] + [detokenizer.flush()]


def assert_pieces_follow_decode(tokenizer, context, generated):
    """The pieces add up to decode(context + generated) after decode(context); after each token, all
    of it is out but an incomplete character at the end (the replacement characters decode gives it)."""
    detokenizer = Detokenizer(tokenizer, context=context)
    before = tokenizer.decode(context)
    out = ""
    for i, token in enumerate(generated):
        out += detokenizer.add(token)
        so_far = tokenizer.decode(context + generated[: i + 1])
        assert before + out == so_far.rstrip(REPLACEMENT) or before + out == so_far, (i, out, so_far)
    out += detokenizer.flush()
    assert before + out == tokenizer.decode(context + generated)


def test_the_first_generated_token_keeps_its_leading_space(default_model):
    tokenizer = default_model.tokenizer
    for prompt in ISSUE_PROMPTS:
        context = tokenizer.encode(prompt)
        completion = tokenizer.encode(prompt + " return 0\n")[len(context):]
        assert "".join(pieces_of(tokenizer, context, completion)) == tokenizer.decode(context + completion)[len(prompt):]
        assert pieces_of(tokenizer, context, completion)[0].startswith(" ")


@given(context=st.text(max_size=12), generated=st.text(min_size=1, max_size=12), chars=st.sampled_from(FRAGMENTS))
@cases(150)
def test_pieces_of_encoded_text(default_model, byte_tokenizer, sentencepiece_tokenizer, context, generated, chars):
    for tokenizer in (default_model.tokenizer, byte_tokenizer, sentencepiece_tokenizer):
        ids = tokenizer.encode(context + chars + generated, add_special_tokens=False)
        split = len(tokenizer.encode(context, add_special_tokens=False))
        assert_pieces_follow_decode(tokenizer, *at_a_character_boundary(tokenizer, ids[:split], ids[split:]))


def at_a_character_boundary(tokenizer, context, generated):
    """Move the split back until the context ends a character, as a text prompt's ids always do."""
    context, generated = list(context), list(generated)
    while context and tokenizer.decode(context).endswith(REPLACEMENT):
        generated.insert(0, context.pop())
    return context, generated


@given(ids=st.lists(st.integers(0, 258), min_size=1, max_size=24), split=st.integers(0, 24))
@cases(300)
def test_pieces_of_any_bytes(byte_tokenizer, ids, split):
    """Any id sequence: invalid UTF-8, lone continuation bytes, special tokens between bytes. The context
    is cut at a character boundary (as a text prompt's encoding always is)."""
    assert_pieces_follow_decode(byte_tokenizer, *at_a_character_boundary(byte_tokenizer, ids[:split], ids[split:]))


@pytest.mark.parametrize("char", ["ñ", "中", "😀", "\u0301"])  # 2, 3, 4 bytes; a combining mark
def test_a_split_character_waits_for_its_last_byte(byte_tokenizer, char):
    ids = byte_tokenizer.encode("e" + char, add_special_tokens=False)  # one token per byte
    assert len(ids) == 1 + len(char.encode())
    assert pieces_of(byte_tokenizer, ids[:1], ids[1:]) == [""] * (len(ids) - 2) + [char, ""]
    cut = pieces_of(byte_tokenizer, ids[:1], ids[1:-1])  # ends inside the character: as decode gives it
    assert cut == [""] * (len(ids) - 2) + [byte_tokenizer.decode(ids[1:-1])] and cut[-1].startswith(REPLACEMENT)


@given(parts=st.lists(st.sampled_from(["a", "b", " ", ".", ",", "!", "?", "'", "n't", "'m", "'s", "'ve", "'re", "x y"]),
                      min_size=1, max_size=10))
@cases(200)
def test_pieces_with_clean_up_of_spaces(cleanup_tokenizer, parts):
    ids = cleanup_tokenizer.encode("w" + "".join(parts), add_special_tokens=False)
    assert "".join(pieces_of(cleanup_tokenizer, ids[:1], ids[1:])) == cleanup_tokenizer.decode(ids)[1:]


def test_the_window_stays_small(default_model):
    """Each token is decoded with a few tokens around it, not with the whole text."""
    tokenizer = default_model.tokenizer
    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return tokenizer.decode(ids)

    text = Path(mtpnb.__file__).read_text()
    ids = tokenizer.encode(text)
    assert "".join(pieces_of(Counting(), ids[:CONTEXT_TOKENS + 7], ids[CONTEXT_TOKENS + 7:])) == \
        tokenizer.decode(ids)[len(tokenizer.decode(ids[:CONTEXT_TOKENS + 7])):]
    assert max(lengths) <= 8 and len(lengths) <= 2 * len(ids)


def test_a_context_that_ends_inside_a_character(byte_tokenizer):
    """The documented exception: a prompt of ids that ends inside a character keeps its replacement
    character; the character's completion is not repeated in the text."""
    ids = byte_tokenizer.encode("ab中cd", add_special_tokens=False)
    context, generated = ids[:3], ids[3:]
    assert byte_tokenizer.decode(context) == "ab" + REPLACEMENT
    assert "".join(pieces_of(byte_tokenizer, context, generated)) == "cd"


# -- the engine ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 3])
@pytest.mark.parametrize("prompt", ISSUE_PROMPTS)
def test_the_issue_reproductions(default_model, prompt, depth):
    r = check_stream(default_model, prompt, depth=depth, max_tokens=6, temperature=0.0)
    tokenizer = default_model.tokenizer
    assert prompt + r.text == tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False) + list(r.tokens))
    assert r.text.startswith(" ")  # ' return 0', ' 1': the space the old detokenizer dropped


@pytest.mark.parametrize("prompt, depth", [('# 中文注释：计算斐波那契数列\n# 中文', 0), ('# 😀😀😀😀😀😀😀😀', 3),
                                           ('print("ça marche, déjà vu, naïve café, crème brûlée, ', 2)])
def test_characters_split_across_tokens(default_model, prompt, depth):
    """Whatever the model writes after these prompts, some of its tokens hold part of a character
    (asserted): the text and the pieces never show a replacement character."""
    r = check_stream(default_model, prompt, depth=depth, max_tokens=12)
    tokenizer = default_model.tokenizer
    assert REPLACEMENT not in r.text and any(ord(c) > 127 for c in r.text)
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in r.tokens)  # some token holds part of a character
    pieces = [e.text for e in r.events if e.kind != "rejected"]
    assert REPLACEMENT not in "".join(pieces) and "" in pieces  # held back, then given out whole


def test_max_tokens_inside_a_character_ends_as_decode_does(default_model):
    """A max_tokens cut that falls inside a character (found on the model's own greedy output) ends
    the text as the tokenizer decodes it there, with its replacement character."""
    prompt = '"""Ünïcödé tëst: 中文注释'
    tokenizer = default_model.tokenizer
    full = default_model.generate(prompt, depth=0, max_tokens=24).tokens
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    cuts = [k for k in range(1, len(full) + 1) if tokenizer.decode(prompt_ids + full[:k]).endswith(REPLACEMENT)]
    assert cuts, "the greedy output never stops inside a character: choose another prompt"
    r = check_stream(default_model, prompt, depth=0, max_tokens=cuts[0])
    assert r.metrics.finish_reason == "length" and r.text.endswith(REPLACEMENT)


@pytest.fixture(scope="module")
def ascii_eos(checkpoints, tiny):
    """The tiny model with every ASCII byte an end-of-sequence token: its generations end right after
    non-ASCII bytes, most often inside a character (what the detokenizer holds back meets EOS)."""
    folder = Path(tempfile.mkdtemp())
    source = checkpoints(family="llama", num_layers=1, hidden_size=32)
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [0] + [tiny.tokenizer.encode(chr(b))[0] for b in range(32, 127)]
    (folder / "config.json").write_text(json.dumps(config))
    return mtpnb.load(folder)


def test_eos_inside_a_character(ascii_eos):
    ended_inside = 0
    for seed in range(40):
        r = check_stream(ascii_eos, "é", depth=seed % 4, max_tokens=16, temperature=1.0, seed=seed)
        if r.metrics.finish_reason == "stop" and r.text.endswith(REPLACEMENT):
            ended_inside += 1
    assert ended_inside >= 5


@given(prompt=PROMPTS, params=generation_settings(max_tokens=6), data=st.data())
@cases(TINY_CASES)
def test_random_cases_on_the_test_checkpoints_tokenizer(tiny, prompt, params, data):
    check_case(tiny, prompt, params, data)


@given(prompt=PROMPTS, params=generation_settings(max_tokens=4), data=st.data())
@cases(DEFAULT_MODEL_CASES)
def test_random_cases_on_the_default_model(default_model, prompt, params, data):
    check_case(default_model, prompt, params, data)


# -- the server and mtpnb.connect ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny):
    from mtpnb.server import Server

    with Server(tiny, port=0) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused")


def server_text(client, name, prompt, params, stream: bool) -> str:
    """The text of an OpenAI SDK request: the message / text, or its stream's chunks joined."""
    args = {"model": name, "max_tokens": params["max_tokens"], "temperature": params["temperature"],
            "seed": params["seed"], "stream": stream, "extra_body": {"mtp_depth": params["depth"]}}
    if "top_p" in params:
        args["top_p"] = params["top_p"]
    if "top_k" in params:
        args["extra_body"]["top_k"] = params["top_k"]
    if params.get("stop"):
        args["stop"] = list(params["stop"])
    if params.get("chat"):
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **args)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
        return out.choices[0].message.content
    out = client.completions.create(prompt=prompt, **args)
    return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text


def check_served(model, client, name, prompt, params):
    local = check_stream(model, prompt, **params)  # the rule holds for these tokens...
    for stream in (False, True):  # ...and the server gives the same text, whole and streamed
        assert server_text(client, name, prompt, params, stream) == local.text, (stream, params)


@given(prompt=PROMPTS, params=generation_settings(max_tokens=6), stop=st.booleans())
@cases(SERVER_CASES)
def test_random_cases_through_the_server(tiny, client, served, prompt, params, stop):
    if stop:
        text = tiny.generate(prompt, **params).text
        if text:
            params = {**params, "stop": (text[len(text) // 2:][:3],)}
    check_served(tiny, client, served.model_name, prompt, params)


@given(prompt=PROMPTS, params=generation_settings(max_tokens=6))
@cases(CONNECT_CASES)
def test_random_cases_through_connect(tiny, served, prompt, params):
    remote = mtpnb.connect(served.url)
    local = check_stream(tiny, prompt, **params)
    shown, result = [], None
    for event in remote.stream(prompt, **params):
        if isinstance(event, TokenEvent):
            shown.append((event.kind, event.text))
        elif isinstance(event, Done):
            result = event.result
    assert result.tokens == local.tokens and result.text == local.text
    assert "".join(text for kind, text in shown if kind != "rejected") == local.text


def test_the_issue_reproductions_through_the_server(default_model):
    openai = pytest.importorskip("openai")
    from mtpnb.server import Server

    with Server(default_model, port=0) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        params = {"depth": 3, "max_tokens": 6, "temperature": 0.0, "seed": 0}
        for prompt in ISSUE_PROMPTS:
            check_served(default_model, client, server.model_name, prompt, params)
        check_served(default_model, client, server.model_name, ISSUE_PROMPTS[0], {**params, "chat": True})
        remote = mtpnb.connect(server.url)
        r = remote.generate(ISSUE_PROMPTS[0], depth=3, max_tokens=6)
        assert ISSUE_PROMPTS[0] + r.text == default_model.tokenizer.decode(
            default_model.tokenizer.encode(ISSUE_PROMPTS[0]) + r.tokens)


# -- the front ends, end to end on the default model ------------------------------------------------------------------
def test_the_front_ends_show_prompt_plus_text(default_model, capsys):
    """`mtpnb generate` (piped and coloured), `%%mtp` (the token view and --no-stream) and the widgets'
    token records all show the prompt followed by exactly the decoded text."""
    import re

    from IPython.core.interactiveshell import InteractiveShell

    from mtpnb import cli
    from mtpnb.terminal import STYLES
    from mtpnb.widgets import stream_to_widget

    prompt = ISSUE_PROMPTS[0]
    tokenizer = default_model.tokenizer
    ref = check_stream(default_model, prompt, depth=3, max_tokens=6)
    decoded = tokenizer.decode(tokenizer.encode(prompt) + ref.tokens)
    assert prompt + ref.text == decoded

    assert cli.main(["generate", "--no-color", "--depth", "3", "--max-tokens", "6", prompt]) == 0
    assert capsys.readouterr().out == ref.text + "\n"  # piped: the text only, then a newline
    assert cli.main(["generate", "--color", "--depth", "3", "--max-tokens", "6", prompt]) == 0
    coloured = capsys.readouterr().out
    rejected = re.compile(r"\x1b\[%sm[^\n]*?\x1b\[0m" % re.escape(STYLES["rejected"][1]))  # shown, not output
    assert rejected.search(coloured)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", rejected.sub("", coloured))
    assert shown.startswith(decoded + "\n")  # the prompt dimmed, the output tokens coloured

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mtpnb")
    try:
        shell.run_line_magic("mtp", "load")
        capsys.readouterr()
        shell.run_cell_magic("mtp", "--depth 3 --max-tokens 6 -o r", prompt)
        r = shell.user_ns["r"]
        assert r.text == ref.text and decoded + "\n-- " in capsys.readouterr().out  # the token view's rendering
        shell.run_cell_magic("mtp", "--no-stream --depth 3 --max-tokens 6", prompt)
        assert capsys.readouterr().out.startswith(ref.text + "\n")
    finally:
        shell.run_line_magic("unload_ext", "mtpnb")

    view, generation = stream_to_widget(default_model, prompt, depth=3, max_tokens=6)
    assert generation.wait().text == ref.text
    assert "".join(text for kind, text, *_ in view.stream.tokens if kind != "rejected") == ref.text
    assert view.stream.prompt + view.stream.text == decoded
