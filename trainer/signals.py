"""Signals of a training job (light module: no torch at import).

* **Parent death.** ``cpt train`` starts ``torchrun``, which starts the workers in their own
  sessions: killing the launcher's process group would leave them training. Every process of the
  job therefore asks Linux to kill it when its parent dies (:mod:`moe_cpt.processes`).
* **Pre-timeout signal (Slurm).** ``SIGUSR1`` asks the training to stop at the end of the current
  step: it writes a checkpoint of that step, records the run as ``preempted``, runs
  ``scontrol requeue $SLURM_JOB_ID`` (``$CPT_SCONTROL`` names another command; only when
  ``SLURM_JOB_ID`` is set) and the workers exit 0; ``cpt train`` then exits with
  :data:`EXIT_PREEMPTED`. All ranks agree on the step (the flag is all-reduced every step), so the
  signal may reach any of them. ``torchrun`` itself ignores ``SIGUSR1`` (its default action would
  kill it, and the workers with it); the launcher forwards it to the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PREEMPT_SIGNAL = signal.SIGUSR1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed and requeued, run again to continue
SCONTROL_ENV = "CPT_SCONTROL"  # the scontrol command to requeue with (tests: a fake one)


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
