"""Text renderings for terminals and plain-text outputs: the model summary, and a generation's tokens
in ANSI colours with the same kinds and second cues as the notebook's TokenStream widget.

    print(describe_model(model.info()))
    for event in model.stream(prompt):
        if isinstance(event, TokenEvent):
            out.write(render_token(event.kind, event.text, color=True))
    print(legend())
"""

from __future__ import annotations

import os

RESET = "\x1b[0m"
DIM = "\x1b[2m"
# kind -> (legend label, SGR parameters, second cue). The colours are the widget's Okabe-Ito colours
# in the 256-colour palette (green 36, vermillion 166, orange 214, sky blue 74); colour never carries
# the meaning alone: each kind but plain also has a cue that survives a monochrome terminal. Accepted
# drafts are shaded green with a line above (SGR 53), as in the widget, never underlined: an underlined
# space reads as "_" in code. Black text on the shade reads on light and dark terminals alike.
STYLES = {
    "accepted": ("accepted draft", "38;5;16;48;5;36;53", "shaded, line above"),
    "rejected": ("rejected draft", "38;5;166;9", "struck through"),
    "correction": ("correction", "38;5;214;7", "highlighted"),
    "bonus": ("bonus", "38;5;74;1", "bold"),
    "plain": ("plain", "", "no mark"),
}
# Control characters would move the cursor or start an escape sequence: show their Unicode
# "control pictures" instead. A rejected draft is not part of the output: its whitespace is shown too.
_VISIBLE = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\t\n"} | {0x7F: "\u2421"}
_VISIBLE_REJECTED = _VISIBLE | {ord("\n"): "\u21b5", ord("\t"): "\u21e5"}


def use_color(stream, flag: bool | None) -> bool:
    """--color / --no-color when given; otherwise on for a terminal, off when piped, off under
    NO_COLOR (no-color.org) or TERM=dumb."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def render_token(kind: str, text: str, color: bool) -> str:
    """A token's text as written to the terminal. Without colour: the output text only (rejected
    drafts are not part of it), untouched, so that piped output is exactly the generated text."""
    if not color:
        return "" if kind == "rejected" else text
    text = text.translate(_VISIBLE_REJECTED if kind == "rejected" else _VISIBLE)
    sgr = STYLES[kind][1]
    if not sgr:
        return text
    # Each line styled apart: a style left open across a line break paints the rest of the line.
    return "\n".join(f"\x1b[{sgr}m{line}{RESET}" if line else "" for line in text.split("\n"))


def render_prompt(prompt: str, color: bool) -> str:
    """The prompt, dimmed, before a coloured output (nothing when the output is plain text)."""
    return f"{DIM}{prompt.translate(_VISIBLE)}{RESET}" if color and prompt else ""


def legend() -> str:
    """One line naming each kind in its own style."""
    return "  ".join(
        f"\x1b[{sgr}m{label}{RESET} ({cue})" if sgr else f"{label} ({cue})" for label, sgr, cue in STYLES.values()
    )


def describe_model(info: dict) -> str:
    """A few aligned lines from Model.info() (or a served model's info): what is loaded, where."""
    parameters = _count(info["parameters"]) if info.get("parameters") else "?"
    if info.get("head_parameters"):
        parameters += f" ({_count(info['head_parameters'])} in the MTP head)"
    layers = str(info.get("layers", "?"))
    if info.get("linear_attention_layers"):
        layers += f" ({info['linear_attention_layers']} linear attention)"
    weights = ", ".join(str(x) for x in (info.get("dtype"), info.get("quantization")) if x)
    if info.get("weights_mb") is not None:
        weights += f", {info['weights_mb']} MB"
    rows = [
        ("family", info.get("family") or "?"),
        ("parameters", parameters),
        ("layers", layers),
        ("MTP head", ("yes" + (f" ({info['mtp_layers']} layers)" if (info.get("mtp_layers") or 1) > 1 else ""))
         if info.get("has_mtp") else "no (plain decoding only)"),
        ("weights", weights or "?"),
        ("device", info.get("device") or "?"),
    ]
    if info.get("verify_kernels"):
        rows.append(("kernels", f"verify kernels {info['verify_kernels']}"))
    if info.get("cpu_kernels"):
        rows.append(("kernels", f"CPU kernels {info['cpu_kernels']}"))
    where = info.get("url") or info.get("path")
    lines = [f"{info.get('name', '?')}" + (f"  ({where})" if where else "")]
    lines += [f"  {key:<11}{value}" for key, value in rows]
    lines += [f"  note       {note}" for note in info.get("notes") or ()]
    return "\n".join(lines)


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)
