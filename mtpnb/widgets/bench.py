"""What streaming into the widgets costs: decode tok/s of the headless engine vs the same generation
streaming into a TokenStream (and LiveCharts), same prompt and seed, runs alternated.

    python -m mtpnb.widgets.bench                    # the default model (a tiny random one if absent)
    python -m mtpnb.widgets.bench --max-tokens 256 --repeats 7 --depth 3

The widgets talk to a comm that JSON-encodes every message as a kernel would and counts them (there
is no front end to send to). Decode tok/s is the engine's own figure: the time the widgets spend
between two events falls inside it. Goal: ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import comm
from comm.base_comm import BaseComm

JUPYTER_MSG_RATE = 1000  # Jupyter Server's default iopub limits: messages / s and bytes / s
JUPYTER_DATA_RATE = 1_000_000


class CountingComm(BaseComm):
    """Encodes each message to JSON, as the kernel would before sending it, and counts them."""

    messages = 0
    bytes = 0

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        CountingComm.messages += 1
        CountingComm.bytes += len(json.dumps({"msg_type": msg_type, "data": data, "metadata": metadata}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mtpnb.widgets.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder or hub repo (default: the embedded default model, "
                                        "or a tiny random checkpoint when there is none); 'tiny' for that one")
    parser.add_argument("--prompt", default="def fibonacci(n):\n")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    comm.create_comm = CountingComm  # before any widget exists
    import mtpnb
    from mtpnb.loading import DEFAULT_MODEL_DIR

    from .runner import Generation
    from .show import GenerationView

    if args.model == "tiny" or (args.model is None and not (DEFAULT_MODEL_DIR / "config.json").exists()):
        from mtpnb.testing import make_checkpoint

        model = mtpnb.load(make_checkpoint(tempfile.mkdtemp(prefix="mtpnb-bench-")))
    else:
        model = mtpnb.load(args.model)
    params = dict(depth=args.depth, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)

    def headless():
        return model.generate(args.prompt, **params)

    def widget(charts: bool):
        def run():
            view = GenerationView(charts=charts)
            return Generation(model, args.prompt, params, view.sinks).start().wait()
        return run

    modes = {"headless": headless, "widget": widget(False), "widget + charts": widget(True)}
    for run in modes.values():  # warm-up: first-call costs out of the timings
        run()
    rates: dict[str, list[float]] = {name: [] for name in modes}
    traffic = {"messages": 0, "bytes": 0, "seconds": 0.0}
    reference = None
    for repeat in range(args.repeats):
        order = list(modes) if repeat % 2 == 0 else list(modes)[::-1]  # alternate: drift hits both sides
        for name in order:
            before = (CountingComm.messages, CountingComm.bytes)
            start = time.perf_counter()
            result = modes[name]()
            if name == "widget":
                traffic["messages"] += CountingComm.messages - before[0]
                traffic["bytes"] += CountingComm.bytes - before[1]
                traffic["seconds"] += time.perf_counter() - start
            reference = reference or result.tokens
            if result.tokens != reference:
                raise SystemExit(f"{name}: the output differs from the first run: same prompt and seed expected")
            rates[name].append(result.metrics.decode_tok_s)

    base = statistics.median(rates["headless"])
    print(f"{model.name}: depth {args.depth}, {args.max_tokens} tokens, temperature {args.temperature}, "
          f"seed {args.seed}; {args.repeats} alternated repeats, medians of the engine's decode tok/s")
    report = {"headless_tok_s": base}
    for name, values in rates.items():
        rate = statistics.median(values)
        line = f"  {name:<16} {rate:8.1f} tok/s"
        if name != "headless":
            ratio = rate / base
            report[f"{name.replace(' + ', '_')}_ratio"] = ratio
            line += f"   ratio {ratio:.3f}" + ("" if ratio >= 0.97 else "   (below the 0.97 goal)")
        print(line)
    msg_rate = traffic["messages"] / traffic["seconds"]
    data_rate = traffic["bytes"] / traffic["seconds"]
    print(f"  widget traffic: {msg_rate:.0f} messages/s, {data_rate / 1e3:.1f} kB/s "
          f"(Jupyter's limits: {JUPYTER_MSG_RATE} messages/s, {JUPYTER_DATA_RATE / 1e6:.0f} MB/s)")
    report.update(messages_per_s=msg_rate, bytes_per_s=data_rate)
    return report


if __name__ == "__main__":
    main()
