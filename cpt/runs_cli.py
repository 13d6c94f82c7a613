"""``cpt runs``: list the runs of a store's run catalog and show one run with its lineage."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cpt.runs import LineageNode, RunCatalog, RunRecord, check_run_id, lineage


def _default_store() -> str:
    from corpus.cli import default_store

    return default_store()


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


def _steps(record: dict[str, Any]) -> str:
    start, end = record.get("start_step"), record.get("end_step")
    return f"{start}-{end}" if start is not None or end is not None else "-"


def _datasets(r: RunRecord) -> str:
    return ", ".join(u.spec[: len(u.dataset) + 13] for u in r.datasets) or "-"


def cmd_ls(args: argparse.Namespace) -> int:
    catalog = RunCatalog(args.store or _default_store())
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

    table = Table("run id", "phase", "parent", "status", "steps", "datasets@versions", "started", box=None)
    for r in records:
        table.add_row(r.run_id, r.phase, r.parent_run_id or "-", r.status or "-", _steps(r.record),
                      _datasets(r), r.first_event_at)
    Console(width=200).print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    catalog = RunCatalog(args.store or _default_store())
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
