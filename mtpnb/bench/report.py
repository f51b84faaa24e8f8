"""The report of a bench run: a plain-text table, static plotly figures, JSON and standalone HTML."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .runs import PHASE_DOC, PHASES

# Okabe-Ito
COLORS = {"blue": "#0072B2", "vermillion": "#D55E00", "orange": "#E69F00", "green": "#009E73",
          "sky": "#56B4E9", "purple": "#CC79A7", "yellow": "#F0E442", "black": "#000000"}
TEMPERATURE_COLORS = (COLORS["blue"], COLORS["vermillion"], COLORS["green"], COLORS["orange"])
LOOPS_LEGEND = ("loops: the share of completions in which an 8-token span occurs 3+ times (text nobody wants, and easy "
                "to draft); no-loop: the speedup over the prompts whose completions loop neither there nor at depth 0, "
                "and on how many of the row's runs it rests")
PHASE_COLORS = dict(zip(PHASES, (COLORS["orange"], COLORS["blue"], COLORS["vermillion"], COLORS["purple"],
                                 COLORS["sky"], COLORS["green"])))


@dataclass
class BenchReport:
    data: dict

    # top-level conveniences
    @property
    def best_speedup_greedy(self) -> float | None:
        return self.data.get("best_speedup_greedy")

    @property
    def best_speedup_sampled(self) -> float | None:
        return self.data.get("best_speedup_sampled")

    def rows(self, engine: str | None = None, temperature: float | None = None) -> list[dict]:
        return [r for r in self.data["results"]
                if (engine is None or r["engine"] == engine) and (temperature is None or r["temperature"] == temperature)]

    def to_dict(self) -> dict:
        return self.data

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        text = json.dumps(self.data, indent=indent, allow_nan=False, default=_json_default) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def summary(self) -> str:
        """A plain-text table a person reads in a terminal."""
        d = self.data
        lines = [
            f"mtpnb bench: {d['model']['name']} ({d['model'].get('parameters', 0) / 1e6:.1f}M params, "
            f"{d['model'].get('dtype')}) on {d['platform']['machine']}, {d['platform']['cpu_count']} cores",
            d["platform"]["blas"]["message"],
            *([f"verify kernels {d['model']['verify_kernels']}"] if d["model"].get("verify_kernels") else []),
            *([f"CPU kernels {d['model']['cpu_kernels']}"] if d["model"].get("cpu_kernels") else []),
            f"{len(d['settings']['prompts'])} code prompts x {d['settings']['repeats']} repeats, "
            f"max_tokens {d['settings']['max_tokens']}, context for the cost model {d['cost_model']['context_tokens']} tokens",
            "verify cost t(M)/t(1), M=1..: " + " ".join(f"{r:.2f}" for r in d["cost_model"]["verify_ratio"])
            + f"  (t1 {d['cost_model']['t1_ms']:.1f} ms)"
            + _draft_costs(d["cost_model"]),
            "",
            f"{'temp':>5} {'engine':>7} {'depth':>5} {'decode tok/s':>12} {'e2e tok/s':>9} {'TTFT ms':>7} "
            f"{'speedup':>7} {'bound':>6} {'of bound':>8} {'tok/verify':>10} {'loops':>5} {'no-loop (runs)':>14}  "
            "acceptance by position",
        ]
        for r in d["results"]:
            mtpnb = r["engine"] == "mtpnb"

            def f(v, fmt, suffix=""):
                return format(v, fmt) + suffix if isinstance(v, (int, float)) else "-"

            fraction = r.get("fraction_of_bound")
            lines.append(
                f"{r['temperature']:>5.2f} {r['engine']:>7} {f(r['depth'], 'd') if mtpnb else '':>5} "
                f"{f(r['decode_tok_s'], '.1f'):>12} {f(r['end_to_end_tok_s'], '.1f'):>9} {f(r['ttft_ms'], '.0f'):>7} "
                f"{f(r.get('speedup'), '.2f', 'x'):>7} "
                # bound, its fraction and tokens per verify are MTP's: nothing to show for mlx-lm
                f"{f(r.get('bound'), '.2f', 'x') if mtpnb else '':>6} "
                f"{f(fraction and 100 * fraction, '.0f', '%') if mtpnb else '':>8} "
                f"{f(r.get('tokens_per_verify'), '.2f') if mtpnb else '':>10} "
                f"{f(r.get('loop_share') and 100 * r['loop_share'], '.0f', '%'):>5} "
                f"{_non_looping(r):>14}  "
                + " ".join(f"{a:.2f}" for a in r.get("acceptance_by_position") or [])
            )
        lines.append("speedup: decode tok/s over depth 0's, paired per repeat; bound: the cost model's ceiling for "
                     "that depth; of bound: speedup / bound (past 100%: the run beat the cost model's estimate, "
                     "within its noise)")
        lines.append(LOOPS_LEGEND)
        lines.append("")
        lines += _best_lines(d)
        if d.get("compare"):
            c = d["compare"]
            lines.append("")
            lines.append(f"alternated in the same run with {c['model']['name']} "
                         f"({(c['model'].get('parameters') or 0) / 1e6:.1f}M params; t1 {c['cost_model']['t1_ms']:.1f} ms, "
                         "verify cost " + " ".join(f"{r:.2f}" for r in c["cost_model"]["verify_ratio"]) + "):")
            for r in c["results"]:
                lines.append(f"{r['temperature']:>5.2f}  depth {r['depth']}  decode {r['decode_tok_s'] or 0:.1f} tok/s  "
                             f"speedup {r['speedup'] or 0:.2f}x  tok/verify {r.get('tokens_per_verify') or 1:.2f}  "
                             f"loops {100 * (r.get('loop_share') or 0):.0f}%  "
                             f"no-loop speedup {_non_looping(r)}")
            lines += _best_lines(c)
        for t, detail in d.get("depth0_vs_mlx_lm_detail", {}).items():
            if detail:
                lines.append(f"mtpnb depth 0 / mlx-lm plain decoding at temperature {t}: {detail['text']}")
        phase_rows = [r for r in d["results"] if r.get("phases")]
        if phase_rows:
            lines += ["", "ms per output token: " + " / ".join(PHASES)]
            for r in phase_rows:
                p = r["phases"]["ms_per_token"]
                lines.append(f"  T={r['temperature']:.2f} depth {r['depth']}: " + " / ".join(f"{p[k]:.2f}" for k in PHASES)
                             + f"  (step {r['phases']['step_ms']:.1f} ms, {r['phases']['tokens'] / r['phases']['steps']:.2f} tok/step)")
        for note in d.get("notes", []):
            lines.append("note: " + note)
        return "\n".join(lines)

    def __repr__(self) -> str:
        g, s = self.best_speedup_greedy, self.best_speedup_sampled
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        return f"<BenchReport {self.data['model']['name']}: best speedup greedy {fmt(g)}, sampled {fmt(s)}>"

    # -- figures -------------------------------------------------------------------------------------
    def figures(self) -> list:
        """Static plotly figures of the report."""
        import plotly.graph_objects as go

        d = self.data
        temps = d["settings"]["temperatures"]
        layout = {"template": "plotly_white", "font": {"size": 13}, "margin": {"t": 60, "l": 60, "r": 20, "b": 50},
                  "legend": {"orientation": "h", "y": -0.2}}
        figs = []

        speed = go.Figure()
        for i, t in enumerate(temps):
            rows = self.rows(temperature=t)
            labels = [("mlx-lm" if r["engine"] == "mlx-lm" else f"depth {r['depth']}") for r in rows]
            speed.add_bar(x=labels, y=[r["decode_tok_s"] for r in rows], name=f"temperature {t}",
                          marker_color=TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)],
                          text=[f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "" for r in rows],
                          textposition="outside",
                          hovertemplate="%{x}: %{y:.1f} tok/s<extra>temperature " + str(t) + "</extra>")
        speed.update_layout(title="Decode speed (tokens/s after the first token; median of repeats)",
                            yaxis_title="decode tok/s", barmode="group", **layout)
        figs.append(speed)

        sp = go.Figure()
        for i, t in enumerate(temps):
            rows = [r for r in self.rows("mtpnb", t)]
            color = TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)]
            sp.add_scatter(x=[r["depth"] for r in rows], y=[r.get("speedup") for r in rows], mode="lines+markers",
                           name=f"measured, T={t}", line={"color": color}, marker={"symbol": "circle", "size": 9})
            sp.add_scatter(x=[r["depth"] for r in rows], y=[r.get("bound") for r in rows], mode="lines+markers",
                           name=f"bound, T={t}", line={"color": color, "dash": "dash"},
                           marker={"symbol": "diamond-open", "size": 9})
        sp.add_hline(y=1.0, line={"color": "gray", "width": 1})
        sp.update_layout(title="Speedup over depth 0: measured (solid) and the cost-model bound (dashed)",
                         xaxis_title="depth (drafts per verify)", yaxis_title="x depth 0 decode tok/s",
                         xaxis={"dtick": 1}, **layout)
        figs.append(sp)

        cm = d["cost_model"]
        ms = list(range(1, len(cm["verify_ratio"]) + 1))
        vc = go.Figure()
        vc.add_scatter(x=ms, y=cm["verify_ratio"], mode="lines+markers", name="t_verify(M) / t_1 (measured)",
                       line={"color": COLORS["blue"]}, marker={"size": 9},
                       customdata=cm["verify_ms"], hovertemplate="M=%{x}: %{y:.2f}x (%{customdata:.1f} ms)<extra></extra>")
        vc.add_scatter(x=ms, y=ms, mode="lines", name="linear: M x t_1", line={"color": "gray", "dash": "dot"})
        for j, (mode, r) in enumerate(cm.get("draft_ratio", {}).items()):
            vc.add_scatter(x=ms, y=[r] * len(ms), mode="lines", name=f"one draft step / t_1 ({mode})",
                           line={"color": (COLORS["orange"], COLORS["green"])[j % 2], "dash": "dash"})
        vc.update_layout(title=f"Verify cost curve (warm cache of {cm['context_tokens']} tokens, t_1 = "
                               f"{cm['t1_ms']:.1f} ms; {d['platform']['blas']['kind']} BLAS)",
                         xaxis_title="tokens in one trunk forward (M = depth + 1)", yaxis_title="x one-token forward",
                         xaxis={"dtick": 1}, **layout)
        figs.append(vc)

        acc = go.Figure()
        dash = ("solid", "dash", "dot", "dashdot")
        for i, t in enumerate(temps):
            for r in self.rows("mtpnb", t):
                if r["depth"] and r.get("acceptance_by_position"):
                    acc.add_scatter(x=list(range(1, r["depth"] + 1)), y=r["acceptance_by_position"],
                                    mode="lines+markers", name=f"T={t}, depth {r['depth']}",
                                    line={"color": TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)],
                                          "dash": dash[(r["depth"] - 1) % len(dash)]})
        acc.update_layout(title="Acceptance per draft position, P(accepted | reached)", xaxis_title="draft position",
                          yaxis_title="acceptance", yaxis={"range": [0, 1.05]}, xaxis={"dtick": 1}, **layout)
        figs.append(acc)

        ph = go.Figure()
        rows = [r for r in d["results"] if r.get("phases")]
        labels = [f"T={r['temperature']} d{r['depth']}" for r in rows]
        for k in PHASES:
            ph.add_bar(x=labels, y=[r["phases"]["ms_per_token"][k] for r in rows], name=k.replace("_", " "),
                       marker_color=PHASE_COLORS[k], hovertemplate="%{x}: %{y:.2f} ms/token<extra>" + PHASE_DOC[k] + "</extra>")
        ph.update_layout(title="Where the time goes: ms per output token, by phase (one profiled run each)",
                         yaxis_title="ms per output token", barmode="stack", **layout)
        figs.append(ph)
        return figs

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """A standalone HTML report: summary, tables and static plotly figures, plotly.js inline (no CDN)."""
        from plotly.offline import get_plotlyjs

        d = self.data
        esc = html.escape
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>mtpnb bench: {esc(d['model']['name'])}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}"
            "table{border-collapse:collapse;margin:12px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}th{background:#f2f2f2}td.l,th.l{text-align:left}.note{color:#555;font-size:13px}"
            ".big{font-size:20px}</style>",
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
            f"<h1>mtpnb bench: {esc(d['model']['name'])}</h1>",
            f"<p class='big'>Best speedup over depth 0: greedy <b>{_fmt(d.get('best_speedup_greedy'), 'x')}</b> "
            f"(depth {d.get('best_depth_greedy')}), sampled <b>{_fmt(d.get('best_speedup_sampled'), 'x')}</b> "
            f"(depth {d.get('best_depth_sampled')})</p>",
            f"<p>{esc(d['platform']['blas']['message'])}</p>",
            "<p>" + "<br>".join(
                f"mtpnb depth 0 / mlx-lm plain decoding at T={esc(str(t))}: <b>{_fmt(v.get('ratio'), 'x', 3)}</b> "
                f"({esc(v['text'])})" for t, v in d.get("depth0_vs_mlx_lm_detail", {}).items() if v) + "</p>",
            f"<p class='note'>{esc(_settings_line(d))}</p>",
            _results_table(d["results"]),
            "<p class='note'>" + "<br>".join(esc(line) for line in [LOOPS_LEGEND, *_best_lines(d)]) + "</p>",
        ]
        if d.get("compare"):
            c = d["compare"]
            parts += [f"<h3>Alternated in the same run with {esc(c['model']['name'])}</h3>",
                      f"<p class='note'>t1 {c['cost_model']['t1_ms']:.1f} ms, verify cost t(M)/t(1) "
                      + " ".join(f"{r:.2f}" for r in c["cost_model"]["verify_ratio"]) + "</p>",
                      _results_table(c["results"]),
                      "<p class='note'>" + "<br>".join(esc(line) for line in _best_lines(c)) + "</p>"]
        for fig in self.figures():
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        parts.append("<h3>Phases</h3><ul class='note'>" + "".join(
            f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in PHASE_DOC.items()) + "</ul>")
        if d.get("blas_comparison"):
            parts.append(_blas_table(d["blas_comparison"]))
        parts.append("<h3>Notes</h3><ul class='note'>" + "".join(f"<li>{esc(n)}</li>" for n in d.get("notes", []))
                     + "</ul>")
        parts.append("<h3>Prompts</h3><ul class='note'>" + "".join(
            f"<li>{esc(p['name'])}: {p['tokens']} tokens</li>" for p in d["settings"]["prompts"]) + "</ul>")
        parts.append(f"<p class='note'>{esc(json.dumps(d['platform'], default=_json_default))}</p></body></html>")
        text = "\n".join(parts)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _best_lines(d: dict) -> list[str]:
    """The best speedups of a model's rows, over all its completions and over those that do not loop."""
    lines = []
    for label in ("greedy", "sampled"):
        v, depth = d.get(f"best_speedup_{label}"), d.get(f"best_depth_{label}")
        w, w_depth = d.get(f"best_speedup_non_looping_{label}"), d.get(f"best_depth_non_looping_{label}")
        runs = d.get(f"best_runs_non_looping_{label}")
        lines.append(f"best_speedup_{label}: " + (f"{v:.2f} (depth {depth})" if v is not None else "-")
                     + "; on completions that do not loop: "
                     + (f"{w:.2f} (depth {w_depth}" + (f", {runs[0]} of {runs[1]} runs)" if runs else ")")
                        if w is not None
                        else "- (every one loops)" if v else "-"))
    return lines


def _non_looping(row: dict) -> str:
    """A row's speedup on the prompts whose completions do not loop, and how many runs it rests on."""
    if "non_looping_runs" not in row:
        return "-"
    return f"{_fmt(row.get('speedup_non_looping'), 'x')} {row['non_looping_runs']}/{row['runs']}"


def _fmt(v, suffix="", digits=2):
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def _settings_line(d) -> str:
    s = d["settings"]
    return (f"{len(s['prompts'])} code prompts, {s['repeats']} repeats after {s['warmup']} warm-up, max_tokens "
            f"{s['max_tokens']}, top_p {s['top_p']}, top_k {s['top_k']} when sampling; mlx {d['platform']['mlx']}, "
            f"mlx-lm {d['platform']['mlx_lm']}, {d['platform']['cpu_count']} cores, {d['platform']['machine']}; "
            f"{d['created']}")


def _results_table(results: list[dict]) -> str:
    head = ("<table><tr><th>T</th><th class='l'>engine</th><th>depth</th><th>decode tok/s</th><th>end-to-end tok/s"
            "</th><th>TTFT ms</th><th>speedup</th><th>bound</th><th>% of bound</th><th>tokens/verify</th>"
            "<th>loops</th><th>no-loop speedup</th><th class='l'>acceptance by position</th><th>peak MB</th></tr>")
    rows = []
    for r in results:
        frac = r.get("fraction_of_bound")
        rows.append(
            f"<tr><td>{r['temperature']}</td><td class='l'>{r['engine']}</td>"
            f"<td>{r['depth'] if r['engine'] == 'mtpnb' else ''}</td><td>{_fmt(r['decode_tok_s'], '', 1)}</td>"
            f"<td>{_fmt(r['end_to_end_tok_s'], '', 1)}</td><td>{_fmt(r['ttft_ms'], '', 0)}</td>"
            f"<td>{_fmt(r.get('speedup'), 'x')}</td><td>{_fmt(r.get('bound'), 'x')}</td>"
            f"<td>{_fmt(frac and 100 * frac, '%', 0) if frac is not None else '-'}</td>"
            f"<td>{_fmt(r.get('tokens_per_verify'))}</td>"
            f"<td>{_fmt(None if r.get('loop_share') is None else 100 * r['loop_share'], '%', 0)}</td>"
            f"<td>{_non_looping(r)}</td>"
            f"<td class='l'>{' '.join(f'{a:.2f}' for a in r.get('acceptance_by_position') or [])}</td>"
            f"<td>{_fmt(r.get('peak_memory_mb'), '', 0)}</td></tr>")
    return head + "".join(rows) + "</table>"


def _blas_table(comp: dict) -> str:
    out = ["<h3>BLAS: the same model with and without OpenBLAS preloaded</h3><table><tr><th class='l'>BLAS</th>"
           "<th>depth-0 decode tok/s</th><th>t_1 ms</th><th class='l'>t_verify(M)/t_1, M = 1..</th></tr>"]
    for name, r in comp.items():
        if not isinstance(r, dict) or "decode_tok_s" not in r:
            continue
        out.append(f"<tr><td class='l'>{html.escape(name)} ({html.escape(str(r.get('kind')))})</td>"
                   f"<td>{_fmt(r['decode_tok_s'], '', 1)}</td><td>{_fmt(r['t1_ms'], '', 1)}</td>"
                   f"<td class='l'>{' '.join(f'{x:.2f}' for x in r['verify_ratio'])}</td></tr>")
    return "".join(out) + "</table>"


def _draft_costs(cost_model: dict) -> str:
    """The cost model's draft step per sampling mode, in t_1, and the later steps' where they differ."""
    later = cost_model.get("later_draft_ratio", {})
    return "".join(f" | draft step/t1 {mode} {r:.2f}" + (f" (the later ones {later[mode]:.2f})" if mode in later else "")
                   for mode, r in cost_model["draft_ratio"].items())
