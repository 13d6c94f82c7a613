"""Real signals to a real ``cpt train`` (issue 11.10 and 11.11).

* ``kill -9`` of the launcher's process group: the workers (torchrun starts them in their own
  sessions) die within seconds instead of training on; while the run lives, a second
  ``cpt train`` on its output folder is refused with one line naming the holder.
* ``SIGUSR1`` (Slurm's pre-timeout signal) to the launcher mid-run: a checkpoint of the current
  step is written and recorded, the Slurm job is requeued (a fake ``scontrol`` named by
  ``CPT_SCONTROL`` records the call), and ``cpt train`` exits with ``EXIT_PREEMPTED`` (75).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_cpt.processes import descendants
from moe_cpt.trainer.output_lock import check_free
from moe_cpt.trainer.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "trainer" / "configs" / "tiny_moe.yaml"
LONG_RUN = ["training.steps=5000", "checkpoint.interval=100000", "eval.samples_per_source=4",
            "eval.batch_size=4"]


def _start(out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "moe_cpt.cli", "train", str(CONFIG), f"run.output_dir={out}",
                             *LONG_RUN], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def _steps_done(out: Path) -> int:
    try:
        return len((out / "steps.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while _steps_done(out) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (out.parent / f"{out.name}.log").read_text()[-4000:]
            raise AssertionError(f"training did not reach step {n} (rc {proc.poll()}):\n{log}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _workers(launcher: int) -> list[int]:
    out = []
    for pid in descendants(launcher):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"moe_cpt.trainer" in cmd and b"torch.distributed.run" not in cmd:
            out.append(pid)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_killing_cpt_train_kills_its_workers_and_a_second_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for_steps(proc, out, 2)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        second = subprocess.run([sys.executable, "-m", "moe_cpt.cli", "train", str(CONFIG), f"run.output_dir={out}",
                                 *LONG_RUN], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cpt: error: output dir"), second.stderr
        assert "in use by another training run (pid " in lines[0] and "on " in lines[0]
        holder = int(lines[0].split("(pid ")[1].split()[0])
        assert holder in workers  # rank 0 holds it
    finally:
        _kill_group(proc)  # kill -9 of the launcher's process group (torchrun is in it, workers are not)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [p for p in workers if _alive(p)]
    for pid in survivors:  # do not leave them training on the shared machine
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "workers kept training after the launcher was killed"
    steps = _steps_done(out)
    time.sleep(2)
    assert _steps_done(out) == steps  # nobody writes to the output folder any more
    check_free(out)  # the lock died with its holder


def test_sigusr1_checkpoints_the_current_step_requeues_and_exits_75(tmp_path: Path) -> None:
    out = tmp_path / "run"
    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    proc = _start(out, {"SLURM_JOB_ID": "4242", "CPT_SCONTROL": str(fake)})
    try:
        _wait_for_steps(proc, out, 3)
        os.kill(proc.pid, signal.SIGUSR1)  # to `cpt train` only: it forwards to the workers
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    log = (tmp_path / "run.log").read_text()[-4000:]
    assert rc == EXIT_PREEMPTED, log
    record = json.loads((out / "run.json").read_text())
    step = record["end_step"]
    assert step >= 3 and record["status"] == "preempted"
    assert step in record["checkpoints"] and str(step) in record["checkpoint_sha256"]
    assert (out / "checkpoint" / f"step-{step}" / ".metadata").is_file()
    assert _steps_done(out) == step  # stopped right after the step it checkpointed
    assert calls.read_text().split() == ["requeue", "4242"]
