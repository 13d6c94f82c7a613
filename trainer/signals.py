"""Process lifetime and signals of a training job (light module: no torch at import).

* **Parent death.** ``cpt train`` starts ``torchrun``, which starts the workers in their own
  sessions: killing the launcher's process group would leave them training. Every process of the
  job therefore asks Linux to kill it when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then
  checks that the parent it was started by is still there (it may have died before the call).
* **Pre-timeout signal (Slurm).** ``SIGUSR1`` asks the training to stop at the end of the current
  step: it writes a checkpoint of that step, records the run as ``preempted``, runs
  ``scontrol requeue $SLURM_JOB_ID`` (``$CPT_SCONTROL`` names another command; only when
  ``SLURM_JOB_ID`` is set) and the workers exit 0; ``cpt train`` then exits with
  :data:`EXIT_PREEMPTED`. All ranks agree on the step (the flag is all-reduced every step), so the
  signal may reach any of them. ``torchrun`` itself ignores ``SIGUSR1`` (its default action would
  kill it, and the workers with it); the launcher forwards it to the workers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREEMPT_SIGNAL = signal.SIGUSR1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed and requeued, run again to continue
SCONTROL_ENV = "CPT_SCONTROL"  # the scontrol command to requeue with (tests: a fake one)
_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits; exit at once if the
    parent is not ``expected_parent`` any more (it died before the call). No-op off Linux."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != expected_parent:
        os._exit(128 + int(sig))


def child_preexec(parent: int, ignore: tuple[int, ...] = ()) -> Callable[[], None]:
    """A ``Popen(preexec_fn=...)`` that ties the child to ``parent`` (SIGTERM on its death, so
    e.g. torchrun still stops its own workers) and ignores ``ignore`` (inherited across exec)."""
    def preexec() -> None:
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
        die_with_parent(parent, signal.SIGTERM)
    return preexec


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (-1 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descendants(pid: int) -> list[int]:
    """The pids of all living descendants of ``pid`` (from ``/proc``), nearest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def forward_signal(sig: int, root: int) -> None:
    """Send ``sig`` to every descendant of ``root`` (the launcher's torchrun and its workers)."""
    for pid in descendants(root):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


@dataclass
class PreemptionRequest:
    """Set by the ``SIGUSR1`` handler; :meth:`agreed` makes all ranks see it at the same step."""

    requested: bool = False
    previous: Any = field(default=None, repr=False)

    def install(self) -> PreemptionRequest:
        self.previous = signal.signal(PREEMPT_SIGNAL, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self, device: Any) -> bool:
        """Whether any rank was asked to stop (one tiny all-reduce per step when distributed)."""
        import torch

        if not torch.distributed.is_initialized():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested


def requeue_job(env: dict[str, str] | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (``$CPT_SCONTROL`` instead of ``scontrol``) when running
    under Slurm; returns whether it was asked. A failing requeue is logged, not fatal: the
    checkpoint is written either way."""
    env = dict(os.environ if env is None else env)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False
    cmd = [env.get(SCONTROL_ENV) or "scontrol", "requeue", job]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("could not requeue Slurm job %s (%s): %s", job, " ".join(cmd), exc)
        return False
    if done.returncode != 0:
        log.error("`%s` failed (%d): %s", " ".join(cmd), done.returncode, done.stderr.strip()[:500])
        return False
    return True
