"""``cpt study STUDY.yaml [--lanes N] [--dry-run] [--emit slurm DIR]`` and
``cpt study report DIR`` (registered into the ``cpt`` command)."""

from __future__ import annotations

import argparse
import sys
import time

from moe_cpt.errors import ConfigError


def _study(args: argparse.Namespace) -> int:
    from moe_cpt.trainer.study import runner
    from moe_cpt.trainer.study.schema import load_study

    if args.target[0] == "report":
        if len(args.target) != 2:
            raise ConfigError("usage: cpt study report DIR")
        from moe_cpt.trainer.study.report import build_report

        index = build_report(runner.from_dir(args.target[1]))
        print(f"report: {index}")
        return 0
    if len(args.target) != 1:
        raise ConfigError("usage: cpt study STUDY.yaml [--lanes N] [--dry-run] [--emit slurm DIR]")
    spec = load_study(args.target[0])
    if args.lanes is not None and args.lanes < 1:
        raise ConfigError("--lanes must be >= 1")
    if args.emit:
        kind, folder = args.emit
        if kind != "slurm":
            raise ConfigError(f"--emit {kind!r}: only 'slurm' is supported")
        from moe_cpt.trainer.study.slurm import emit

        study = runner.prepare(spec, offline=args.offline)
        submit = emit(study, folder)
        print(f"wrote {len(study.plans)} sbatch files + report.sbatch to {folder}; submit with {submit}")
        return 0
    if args.dry_run:
        runner.dry_run(runner.prepare(spec, write=False, offline=args.offline))
        return 0
    if args.offline:
        raise ConfigError("--offline is for --dry-run and --emit only (training reads the data)")
    study = runner.prepare(spec)
    t0 = time.monotonic()
    print(f"study {spec.name} ({study.study_id}): {len(study.plans)} runs in {study.root}, "
          f"{args.lanes or spec.lanes} lane(s)", flush=True)
    runner.run_study(study, lanes=args.lanes)
    from moe_cpt.trainer.study.report import build_report

    index = build_report(study)
    print(f"study {spec.name} finished in {time.monotonic() - t0:.0f} s; report: {index}")
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study", help="run a CPT study (pre-train, CPT with replay, re-train) and its report",
        description="Run every run of a study file (docs/study.md) in dependency order, resuming "
        "what was interrupted, then write <study dir>/report/. `cpt study report DIR` rebuilds "
        "the report of a study folder without training.")
    p.add_argument("target", nargs="+", metavar="STUDY.yaml | report DIR")
    p.add_argument("--lanes", type=int, default=None,
                   help="runs side by side (default: the study file's lanes, 2)")
    p.add_argument("--dry-run", action="store_true", help="print every run's command and config")
    p.add_argument("--emit", nargs=2, metavar=("slurm", "DIR"),
                   help="write one sbatch file per run and DIR/submit.sh (afterok chains)")
    p.add_argument("--offline", action="store_true",
                   help="with --dry-run/--emit: do not open the data (refs stay unpinned, the "
                        "vocabulary is the flavor's)")
    p.set_defaults(func=_study, needs=("torch", "torchtitan", "matplotlib"))
