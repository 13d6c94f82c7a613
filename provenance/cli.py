"""``cpt runs``: list the runs of a store's run catalog and show one run with its lineage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moe_cpt.provenance import logs
from moe_cpt.provenance.catalog import RunCatalog
from moe_cpt.provenance.lineage import LineageNode, lineage
from moe_cpt.provenance.record import read_run_record
from moe_cpt.provenance.schema import RunRecord, check_run_id
from moe_cpt.store.object_store import default_store


def register(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="training runs and mix streams, and the dataset versions they read",
                          description="The run catalog of a store (<store>/_runs): every training run and "
                          "`cpt mix` stream that read one of its dataset versions.")
    rsub = runs.add_subparsers(dest="runs_command", metavar="SUBCOMMAND", required=True)
    help_store = "store URL: local folder, file:// or s3://bucket/prefix (default: $CPT_STORE or the corpus default)"

    p = rsub.add_parser("ls", help="list the runs in a store's catalog")
    p.add_argument("--store", default=None, help=help_store)
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.set_defaults(func=cmd_ls)

    p = rsub.add_parser("show", help="one run's record and lineage (dataset versions, through parent runs)")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--store", default=None, help=help_store)
    p.add_argument("--json", action="store_true", help="print {record, lineage} as JSON")
    p.set_defaults(func=cmd_show)

    p = rsub.add_parser("compare", help="draw the curves of runs side by side (val loss per source, "
                        "train loss) and print their final values",
                        description="RUN is a run id of the store's catalog or a run's output folder. "
                        "Curves are read from each run's folder, one row per step (resumed segments "
                        "deduplicated).")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--store", default=None, help=help_store)
    p.add_argument("--out", default="compare.png", help="the figure (PNG; default compare.png)")
    p.add_argument("--json", action="store_true", help="print the curves as JSON")
    p.set_defaults(func=cmd_compare, needs=("matplotlib",))


def _steps(record: dict[str, Any]) -> str:
    start, end = record.get("start_step"), record.get("end_step")
    return f"{start}-{end}" if start is not None or end is not None else "-"


def _datasets(r: RunRecord) -> str:
    return ", ".join(u.spec[: len(u.dataset) + 13] for u in r.datasets) or "-"


def cmd_ls(args: argparse.Namespace) -> int:
    catalog = RunCatalog(args.store or default_store())
    records = catalog.list()
    if args.json:
        for r in records:
            sys.stdout.write(json.dumps(r.to_json(), sort_keys=True, default=str) + "\n")
        return 0
    if not records:
        print(f"no runs in {catalog.url}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("run id", "name", "phase", "parent", "status", "steps", "datasets@versions", "started",
                  box=None)
    for r in records:
        table.add_row(r.run_id, str(r.record.get("name") or "-"), r.phase, r.parent_run_id or "-",
                      r.status or "-", _steps(r.record), _datasets(r), r.first_event_at)
    Console(width=200).print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    catalog = RunCatalog(args.store or default_store())
    run = catalog.get(args.run_id)  # NotFoundError -> one line, exit 2
    nodes = lineage(args.run_id, [catalog])
    if args.json:
        out = {**run.to_json(), "lineage": [n.to_json() for n in nodes]}
        sys.stdout.write(json.dumps(out, indent=1, sort_keys=True, default=str) + "\n")
        return 0
    _print_run(run)
    print("lineage:")
    for node in nodes:
        _print_node(node)
    return 0


def _print_run(run: RunRecord) -> None:
    r = run.record
    code = r.get("code") or {}
    data = r.get("data") or {}
    blend = data.get("blend") or {}
    print(f"run {run.run_id}  ({run.events} events in {run.store}, {run.first_event_at} .. {run.last_event_at})")
    rows = [
        ("phase", run.phase or "-"),
        ("status", run.status or "-"),
        ("parent", run.parent_run_id or "-"),
        ("steps", _steps(r)),
        ("code", f"{code.get('git_commit') or '?'}{' (dirty)' if code.get('dirty') else ''}"),
        ("data", data.get("kind", "-")),
        ("blend fingerprint", blend.get("fingerprint", "-")),
        ("tokenizer sha256", blend.get("tokenizer_sha256", "-")),
        ("checkpoints", ", ".join(str(c) for c in r.get("checkpoints") or []) or "-"),
    ]
    weights = ", ".join(f"{s.get('name')}={s.get('weight')}" for s in blend.get("sources") or [])
    if weights:
        rows.append(("weights", weights))
    if run.skipped:
        rows.append(("unreadable events", ", ".join(run.skipped)))
    for k, v in rows:
        print(f"  {k + ':':<19}{v}")
    schedule = blend.get("schedule") or []
    if schedule:
        print(f"  {'schedule:':<19}" + "; ".join(f"step {k.get('step')}: {k.get('weights')}" for k in schedule))


def _print_node(node: LineageNode) -> None:
    indent = "  " * (node.depth + 1)
    if node.record is None:
        print(f"{indent}{node.run_id}  (record not found in any catalog or run folder)")
        return
    r = node.record
    print(f"{indent}{node.run_id}  phase={r.get('phase', '-')} status={r.get('status', '-')} "
          f"steps={_steps(r)}")
    uses = node.datasets
    if not uses:
        print(f"{indent}  no dataset versions ({(r.get('data') or {}).get('kind', 'unknown')} data)")
    for u in uses:
        epochs = f", {u.epochs:.3f} epochs" if u.epochs is not None else ""
        print(f"{indent}  {u.source}: {u.spec}  {u.tokens:,} tokens{epochs}  [{u.store}]")


def _run_folder(run: str, catalog: RunCatalog | None) -> tuple[str, str]:
    """``(label, folder)`` of RUN: an existing run folder (holding run.json), else a run id of
    the catalog whose recorded ``config.run.output_dir`` is its folder."""
    from moe_cpt.errors import NotFoundError

    if (Path(run) / "run.json").exists():
        return run, run
    check_run_id(run)
    if catalog is None:
        raise NotFoundError(f"{run!r} is neither a run folder nor a run id")
    rec = catalog.get(run).record
    folder = str(((rec.get("config") or {}).get("run") or {}).get("output_dir") or "")
    if not folder or not (Path(folder) / "run.json").exists():
        raise NotFoundError(f"run {run}: its output folder {folder or '(not recorded)'} is not "
                            "readable here")
    return str(rec.get("name") or run), folder


def compare_curves(folders: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per run: label, folder, eval curve (``val_loss/<source>`` per step) and train loss per
    step, one row per step."""
    out = []
    for label, folder in folders:
        rec = read_run_record(folder)
        evals = logs.evals(folder)
        sources = sorted({k.split("/", 1)[1] for r in evals for k in r if k.startswith("val_loss/")})
        out.append({
            "label": label, "folder": folder, "run_id": rec.get("run_id", ""),
            "phase": rec.get("phase", ""), "status": rec.get("status", ""),
            "val_loss": {s: [[int(r["step"]), float(r[f"val_loss/{s}"])] for r in evals
                             if f"val_loss/{s}" in r] for s in sources},
            "train_loss": [[int(r["step"]), float(r["loss"])] for r in logs.steps(folder)
                           if isinstance(r.get("loss"), int | float)],
        })
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    needs_catalog = any(not (Path(r) / "run.json").exists() for r in args.runs)
    catalog = RunCatalog(args.store or default_store()) if needs_catalog else None
    runs = compare_curves([_run_folder(r, catalog) for r in args.runs])
    if args.json:
        sys.stdout.write(json.dumps(runs, sort_keys=True) + "\n")
    else:
        for r in runs:
            finals = ", ".join(f"{s} {v[-1][1]:.4f}" for s, v in r["val_loss"].items() if v) or "-"
            steps = r["train_loss"][-1][0] if r["train_loss"] else 0
            print(f"{r['label']}  ({r['phase'] or '-'}, {r['status'] or '-'}, {steps} steps)  "
                  f"final val loss: {finals}")
    _draw_compare(runs, args.out)
    print(f"figure: {args.out}")
    return 0


def _draw_compare(runs: list[dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({s for r in runs for s in r["val_loss"]})
    panels = ["train loss"] + [f"val loss/{s}" for s in sources]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for r in runs:
            pts = r["train_loss"] if panel == "train loss" else r["val_loss"].get(panel.split("/", 1)[1], [])
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="" if panel == "train loss" else "o", ms=3, label=r["label"])
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
