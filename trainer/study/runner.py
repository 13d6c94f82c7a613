"""Running a study: prepare its folder, run its runs in dependency order on N lanes, resume.

* :func:`prepare` checks the study (file, data, every derived run config) before anything
  starts, pins A and B to version ids (kept in ``study.json``, so a restart after ``@latest``
  moved trains on the same data), and writes every run's config and blend into the study folder.
* :func:`run_study` runs what is not finished yet: a run whose ``run.json`` says ``finished``
  at its last step is skipped, an interrupted one is started with the same command (the
  trainer resumes from its latest checkpoint, bit-exactly), a queued one starts once its
  parent is finished. Up to ``lanes`` runs at a time, each ``cpt train`` with
  ``threads_per_run`` threads per process.
* Progress: a live table (a terminal) or one line per change (a log) of every run's state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from moe_cpt.errors import ConfigError, CptError
from moe_cpt.trainer.study.grid import RunPlan, check_configs, derive_runs, study_dir
from moe_cpt.trainer.study.schema import PinnedData, StudySpec, check_data

STUDY_RECORD = "study.json"
TRAIN_COMMAND = (sys.executable, "-m", "moe_cpt.cli", "train")  # + config path
SINGLE_PROCESS_COMMAND = (sys.executable, "-m", "moe_cpt.trainer")  # parallel.nproc = 1


@dataclass
class Study:
    spec: StudySpec
    data: PinnedData
    plans: list[RunPlan]
    study_id: str
    root: Path
    offline: bool = False  # prepared without opening the data: no run catalog is written

    def plan(self, key: str) -> RunPlan:
        return next(p for p in self.plans if p.key == key)


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_study_record(root: str | Path) -> dict[str, Any]:
    p = Path(root) / STUDY_RECORD
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise ConfigError(f"{p} is unreadable ({exc})") from exc


def prepare(spec: StudySpec, *, write: bool = True, offline: bool = False) -> Study:
    """Check everything and derive the runs; with ``write``, create the study folder's
    ``study.json``, ``configs/`` and ``blends/``. Raises before any run starts. ``offline``
    (dry runs, Slurm files for another site): A and B are not opened, their refs stay as
    written and the vocabulary is the flavor's."""
    from moe_cpt.provenance.schema import new_run_id

    root = study_dir(spec)
    previous = read_study_record(root)
    if previous and previous.get("study_sha256") != spec.sha256:
        raise ConfigError(f"{root} holds study {previous.get('name')!r} from another study file "
                          f"(sha256 {str(previous.get('study_sha256'))[:12]} vs {spec.sha256[:12]}); "
                          "set output_dir to a new folder")
    data = PinnedData(spec.a.dataset, spec.b.dataset, "", 0) if offline else check_data(spec)
    if previous.get("data"):  # keep the versions the study started with
        d = previous["data"]
        data = PinnedData(d["a"], d["b"], d["tokenizer_sha256"], int(d["vocab_size"]))
    plans = derive_runs(spec, data)
    check_configs(plans)
    study = Study(spec, data, plans, previous.get("study_id") or new_run_id(), root, offline)
    if write:
        for p in plans:
            _write_if_changed(Path(p.blend_path), yaml.safe_dump(p.blend, sort_keys=False))
            _write_if_changed(Path(p.config_path), yaml.safe_dump(p.config, sort_keys=False))
        write_study_record(study, status=previous.get("status", "prepared"))
    return study


def run_states(study: Study) -> dict[str, dict[str, Any]]:
    """Per run key: ``state`` (done / partial / queued), ``step``, ``run_id``."""
    from moe_cpt.provenance.record import read_run_record

    out = {}
    for p in study.plans:
        rec = read_run_record(p.output_dir) if Path(p.output_dir).exists() else {}
        done = rec.get("status") == "finished" and int(rec.get("end_step", -1)) == p.steps
        out[p.key] = {"state": "done" if done else ("partial" if rec else "queued"),
                      "step": int(rec.get("end_step") or 0), "run_id": rec.get("run_id", "")}
    return out


def write_study_record(study: Study, status: str, states: dict[str, dict[str, Any]] | None = None,
                       timings: dict[str, float] | None = None) -> dict[str, Any]:
    """``study.json`` in the study folder (and, best effort, an event in the run catalog of A's
    store, kind ``study``): study id, file, pinned data, and every run with its run id."""
    states = states or run_states(study)
    previous = read_study_record(study.root)
    wall = dict(previous.get("wall_s") or {})
    wall.update(timings or {})
    record = {
        "study_id": study.study_id, "name": study.spec.name, "phase": "study", "status": status,
        "study_file": str(Path(study.spec.path).absolute()), "study_sha256": study.spec.sha256,
        "study_text": study.spec.text, "data": study.data.to_json(),
        "runs": [{"key": p.key, "name": p.name, "kind": p.kind, "variant": p.variant.key,
                  "flavor": p.variant.flavor, "router": p.variant.router, "seed": p.variant.seed,
                  "replay": p.replay, "steps": p.steps, "parent": p.parent,
                  "run_dir": p.output_dir, "config": p.config_path,
                  "run_id": states[p.key]["run_id"], "state": states[p.key]["state"]}
                 for p in study.plans],
        "wall_s": wall,
    }
    _write_if_changed(study.root / STUDY_RECORD, json.dumps(record, indent=1, sort_keys=True))
    if not study.offline:
        _catalog_event(study, record)
    return record


def _catalog_event(study: Study, record: dict[str, Any]) -> None:
    from moe_cpt.provenance.catalog import RunCatalog

    event = {"run_id": study.study_id, "phase": "study", "name": study.spec.name,
             "status": record["status"], "study_file": record["study_file"],
             "study_sha256": record["study_sha256"], "study_dir": str(study.root),
             "study_runs": [{"name": r["name"], "run_id": r["run_id"], "run_dir": r["run_dir"]}
                            for r in record["runs"]]}
    try:
        RunCatalog(study.spec.a.store).append(study.study_id, event, "study")
    except Exception as exc:  # the catalog is a convenience: a study runs without it
        logging.getLogger(__name__).warning("study %s: run catalog not written (%s)",
                                            study.study_id, exc)


# ---- progress ------------------------------------------------------------------------------

@dataclass
class Lane:
    plan: RunPlan
    proc: subprocess.Popen
    log: IO[str]
    started: float
    start_step: int


@dataclass
class Progress:
    """The live table of runs (rich on a terminal, one line per change otherwise)."""

    study: Study
    stream: IO[str] = field(default_factory=lambda: sys.stdout)
    live: Any = None
    last: dict[str, str] = field(default_factory=dict)
    every_s: float = 30.0  # without a terminal: the running runs' steps and ETAs this often
    last_line: float = 0.0

    def __post_init__(self) -> None:
        if self.stream.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=self.stream), refresh_per_second=1)
            self.live.start()

    def rows(self, states: dict[str, str], lanes: dict[str, Lane]) -> list[tuple[str, str, str]]:
        out = []
        for p in self.study.plans:
            state = states[p.key]
            detail = ""
            if p.key in lanes:
                lane = lanes[p.key]
                step = _current_step(p.output_dir)
                done = step - lane.start_step
                if done > 0:
                    eta = (time.monotonic() - lane.started) / done * (p.steps - step)
                    detail = f"step {step}/{p.steps}, ETA {eta:.0f} s"
                else:
                    detail = f"step {step}/{p.steps}, starting"
            out.append((p.name, state, detail))
        return out

    def update(self, states: dict[str, str], lanes: dict[str, Lane]) -> None:
        rows = self.rows(states, lanes)
        if self.live is not None:
            from rich.table import Table

            table = Table("run", "state", "progress", title=f"study {self.study.spec.name}")
            for r in rows:
                table.add_row(*r)
            self.live.update(table)
            return
        for name, state, _ in rows:
            if self.last.get(name) != state:
                self.last[name] = state
                self.stream.write(f"[study] {name}: {state}\n")
        now = time.monotonic()
        if lanes and now - self.last_line >= self.every_s:
            self.last_line = now
            counts = {s: list(states.values()).count(s) for s in ("done", "running", "queued", "failed")}
            self.stream.write(f"[study] {counts['done']} done, {counts['running']} running, "
                              f"{counts['queued']} queued, {counts['failed']} failed; "
                              + "; ".join(f"{n}: {d}" for n, st, d in rows if st == "running") + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _current_step(run_dir: str) -> int:
    """The last step in ``steps.jsonl`` (read from its tail)."""
    p = Path(run_dir) / "steps.jsonl"
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


# ---- running --------------------------------------------------------------------------------

def train_command(plan: RunPlan) -> list[str]:
    """``cpt train CONFIG`` (torchrun); a one-process run is the worker itself,
    ``python -m moe_cpt.trainer CONFIG`` (the same training without the launcher's and torchrun's two
    extra interpreters: half the start-up time of a tiny run here)."""
    if int(plan.config["parallel"]["nproc"]) == 1:
        return [*SINGLE_PROCESS_COMMAND, plan.config_path]
    return [*TRAIN_COMMAND, plan.config_path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(plan: RunPlan, threads: int, start_step: int) -> Lane:
    from moe_cpt.processes import child_preexec

    env = dict(os.environ)
    if train_command(plan)[:3] == list(SINGLE_PROCESS_COMMAND):  # what torchrun would set
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    Path(plan.output_dir).parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{plan.output_dir}.log", "a")  # noqa: SIM115 - closed when the lane ends
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(train_command(plan))}\n")
    log.flush()
    proc = subprocess.Popen(train_command(plan), env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=child_preexec(os.getpid()))  # noqa: PLW1509
    return Lane(plan, proc, log, time.monotonic(), start_step)


def run_study(study: Study, *, lanes: int | None = None, threads: int | None = None,
              stream: IO[str] | None = None, poll_s: float = 1.0) -> dict[str, str]:
    """Run every unfinished run; returns the final state per run key (done / failed /
    blocked). Raises :class:`CptError` when a run failed (after the others that could run)."""
    lanes = lanes or study.spec.lanes
    threads = threads or study.spec.threads_per_run
    initial = run_states(study)
    states = {k: ("done" if v["state"] == "done" else "queued") for k, v in initial.items()}
    progress = Progress(study, stream or sys.stdout)
    running: dict[str, Lane] = {}
    timings: dict[str, float] = {}
    write_study_record(study, "running", initial)
    try:
        while True:
            for key, lane in list(running.items()):
                rc = lane.proc.poll()
                if rc is None:
                    continue
                lane.log.close()
                del running[key]
                rs = run_states(study)[key]
                prev = float(read_study_record(study.root).get("wall_s", {}).get(key) or 0.0)
                timings[key] = round(prev + time.monotonic() - lane.started, 1)  # all segments
                states[key] = "done" if rc == 0 and rs["state"] == "done" else "failed"
                write_study_record(study, "running", timings=timings)
                timings.clear()
            for p in study.plans:  # runs whose parent failed cannot run
                if states[p.key] == "queued" and p.parent and states[p.parent] in ("failed", "blocked"):
                    states[p.key] = "blocked"
            for p in study.plans:
                if len(running) >= lanes:
                    break
                if states[p.key] != "queued" or any(states[d] != "done" for d in p.depends_on):
                    continue
                running[p.key] = _start(p, threads, _current_step(p.output_dir))
                states[p.key] = "running"
            progress.update(states, running)
            if not running:
                break
            time.sleep(poll_s)
    finally:
        for lane in running.values():  # interrupted: stop our runs (they resume on restart)
            lane.proc.terminate()
            lane.proc.wait()
            lane.log.close()
        progress.close()
    failed = [k for k, s in states.items() if s in ("failed", "blocked")]
    write_study_record(study, "failed" if failed else "finished")
    if failed:
        logs = ", ".join(f"{study.plan(k).output_dir}.log" for k, s in states.items() if s == "failed")
        raise CptError(f"study {study.spec.name}: {len(failed)} run(s) did not finish "
                       f"({', '.join(failed)}); see {logs}")
    return states


def dry_run(study: Study, stream: IO[str] | None = None) -> None:
    """Print every run's command and config, in dependency order."""
    out = stream or sys.stdout
    out.write(f"# study {study.spec.name} ({study.study_id}): {len(study.plans)} runs in "
              f"{study.root}\n# data: a={study.data.a} b={study.data.b}\n")
    for p in study.plans:
        after = f"  (after {p.parent})" if p.parent else ""
        out.write(f"\n## {p.name}{after}\n$ OMP_NUM_THREADS={study.spec.threads_per_run} "
                  f"{' '.join(train_command(p))}\n")
        out.write(yaml.safe_dump({"config": p.config, "blend": p.blend}, sort_keys=False))


def from_dir(folder: str | Path) -> Study:
    """The study recorded in ``folder/study.json`` (its file's text, pinned data), with its
    runs derived again under ``folder``; opens no data (``cpt study report``)."""
    from moe_cpt.trainer.study.schema import parse_study

    root = Path(folder).absolute()
    rec = read_study_record(root)
    if not rec:
        raise ConfigError(f"{root} is not a study folder (no {STUDY_RECORD}; start it with "
                          "`cpt study STUDY.yaml`)")
    spec = parse_study(yaml.safe_load(rec["study_text"]), rec.get("study_file", str(root)),
                       rec["study_text"])
    spec = dataclasses.replace(spec, output_dir=str(root))
    d = rec["data"]
    data = PinnedData(d["a"], d["b"], d["tokenizer_sha256"], int(d["vocab_size"]))
    return Study(spec, data, derive_runs(spec, data), rec["study_id"], root)
