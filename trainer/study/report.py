"""The study report (``<study dir>/report/``): ``results.json`` (every number), ``results.md``
(the tables in Markdown), ``index.html`` (one self-contained page, figures embedded as PNG data
URIs), the figures as PNG files, and ``timings.json`` (wall time of each run).

:func:`build_report` reads only the finished runs' folders: ``cpt study report DIR`` rebuilds
it without training.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path
from typing import Any

from moe_cpt.trainer.study import plots
from moe_cpt.trainer.study.results import collect
from moe_cpt.trainer.study.runner import Study, read_study_record
from moe_cpt.trainer.study.verdicts import Thresholds, findings

REPORT_DIR = "report"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


TABLE_TITLES = {
    "final_val_loss": "Final val loss per source and variant (mean over seeds; `_sd`: std over seeds)",
    "forgetting": "Forgetting on A (val loss at the end of CPT minus at its start) and the change on B",
    "cpt_vs_retrain": "CPT minus full re-train, final val loss (compute share: CPT tokens / re-train tokens)",
    "moe_minus_dense": "MoE minus dense (FLOP-matched) final val loss at equal tokens",
    "mri_before_after": "Eval MRI (max over layers) at the start and end of CPT, per source; floor = k/E",
}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no data_\n"
    cols = _columns(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>no data</em></p>"
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def group_text(g: dict[str, Any]) -> str:
    """One compared group of a claim: its value, spread, seeds (and end level where measured)."""
    end = f", end {g['end']:.4f}" if "end" in g else ""
    return (f"{g['group']}: {g['value']:+.4f} (spread {g['spread']:.4f}, {g['seeds']} seed(s){end})"
            f" -> {g['verdict']}")


def finding_lines(f: dict[str, Any]) -> list[str]:
    """A claim as text: verdict, what was measured, and each group's numbers."""
    lines = [f"{f['claim']}: **{f['verdict']}**", f"  measured: {f['measure']}"]
    for g in f["groups"]:
        lines.append(f"  - {group_text(g)}")
    if f.get("by_router"):
        lines.append("  by router: " + ", ".join(f"{k}: {v}" for k, v in f["by_router"].items()))
    if not f["groups"]:
        lines.append("  (no runs to compare)")
    return lines


def timings_rows(study: Study) -> list[dict[str, Any]]:
    wall = read_study_record(study.root).get("wall_s") or {}
    return [{"run": p.name, "steps": p.steps, "tokens": p.steps * study.spec.tokens_per_step,
             "wall_s": wall.get(p.key)} for p in study.plans]


def build_report(study: Study) -> Path:
    """Write the report folder; returns the path of ``index.html``."""
    out = study.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    results = collect(study)
    th = Thresholds(**study.spec.thresholds)
    results["thresholds"] = dataclasses.asdict(th)
    results["findings"] = findings(results, th)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    timings = timings_rows(study)
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    figures = plots.draw_all(results, out)
    _write_markdown(study, results, timings, out / "results.md")
    index = out / "index.html"
    index.write_text(_html(study, results, timings, figures))
    return index


def _header(study: Study, results: dict[str, Any]) -> list[str]:
    st = results["settings"]
    return [f"study {study.spec.name}: A = {results['data']['a']} ({results['data']['a_label']}), "
            f"B = {results['data']['b']} ({results['data']['b_label']})",
            f"pre-training {st['pretrain_steps']} steps ({st['pretrain_tokens']:,} tokens), CPT "
            f"{st['cpt_steps']} steps ({st['cpt_tokens']:,} tokens), schedule {st['schedule']}, "
            f"replay {st['replay']} ({st['replay_mode']}), re-train at {st['retrain']}, seeds {st['seeds']}"]


def _write_markdown(study: Study, results: dict[str, Any], timings: list[dict[str, Any]], path: Path) -> None:
    parts = [f"# Study {study.spec.name}\n", *(line + "  " for line in _header(study, results)), "",
             "## Findings\n"]
    for f in results["findings"]:
        parts += finding_lines(f) + [""]
    for key, title in TABLE_TITLES.items():
        parts += [f"## {title}\n", markdown_table(results["tables"][key])]
    parts += ["## Wall time per run\n", markdown_table(timings)]
    parts += ["## Figures\n"] + [f"![{plots.TITLES[n]}]({n}.png)\n" for n in plots.PLOTS]
    path.write_text("\n".join(parts))


CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;
padding:3px 7px;text-align:right}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.verdict{font-weight:bold}.reproduced{color:#17702b}.not{color:#a31515}.inc{color:#8a6d00}
li{margin:.2em 0}"""


def _verdict_class(v: str) -> str:
    return "reproduced" if v == "reproduced" else ("not" if v.startswith("not") else "inc")


def _html(study: Study, results: dict[str, Any], timings: list[dict[str, Any]],
          figures: dict[str, Path]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>study {e(study.spec.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Study {e(study.spec.name)}</h1>"]
    parts += [f"<p>{e(line)}</p>" for line in _header(study, results)]
    parts.append("<h2>Findings</h2><ul>")
    for f in results["findings"]:
        v = f["verdict"]
        groups = "".join(f"<li>{e(group_text(g)).replace('-&gt;', '&rarr;')}</li>" for g in f["groups"])
        parts.append(f"<li>{e(f['claim'])}: <span class='verdict {_verdict_class(v)}'>{e(v)}</span>"
                     f"<br><small>{e(f['measure'])}</small><ul>{groups or '<li>no runs to compare</li>'}"
                     "</ul></li>")
    parts.append("</ul>")
    for key, title in TABLE_TITLES.items():
        parts += [f"<h2>{e(title)}</h2>", html_table(results["tables"][key])]
    parts += ["<h2>Wall time per run</h2>", html_table(timings), "<h2>Figures</h2>"]
    for name in plots.PLOTS:
        data = base64.b64encode(figures[name].read_bytes()).decode()
        parts.append(f"<h3>{e(plots.TITLES[name])}</h3><img id='fig-{name}' alt='{e(name)}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
