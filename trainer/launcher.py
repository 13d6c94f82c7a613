"""``cpt train``: resolve the config, check what the run will read, then start ``torchrun`` with
``parallel.nproc`` processes.

Before any process starts (one ``cpt: error: ...`` line otherwise, nothing written to the output
folder): the config (keys, types, values), the recorded inputs of the run it continues, the
checkpoint it will load (``moe_cpt.trainer.checkpoint_trust``), the data source against the model
(``moe_cpt.trainer.data.check_source_shape`` on the opened blend) and that no other run holds the output
folder (``moe_cpt.trainer.output_lock``). ``torchrun`` dies with the launcher (``PR_SET_PDEATHSIG``; the
workers die with it in turn) and ignores ``SIGUSR1``, which the launcher forwards to the workers
(``moe_cpt.trainer.signals``: checkpoint, then requeue; exit code :data:`EXIT_PREEMPTED`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import IO, Any

from moe_cpt.processes import child_preexec, forward_signal
from moe_cpt.provenance.record import read_run_record
from moe_cpt.trainer.config import CptConfig, load_config
from moe_cpt.trainer.output_lock import check_free
from moe_cpt.trainer.resume import check_checkpoint, check_run_inputs, is_resume, recorded_blend
from moe_cpt.trainer.signals import EXIT_PREEMPTED, PREEMPT_SIGNAL

LAUNCHER_PID_ENV = "CPT_LAUNCHER_PID"


def torchrun_command(config_path: str | None, overrides: Sequence[str], nproc: int) -> list[str]:
    """Single-node ``torchrun`` (``--standalone`` picks a free rendezvous port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "--local-ranks-filter", "0", "-m", "moe_cpt.trainer"]
    if config_path:
        cmd.append(str(config_path))
    return cmd + list(overrides)


def check_data_source(cfg: CptConfig, record: dict[str, Any]) -> None:
    """Open the blend the workers will read (a resume: the recorded resolved blend) and run the
    workers' own shape checks on it (``moe_cpt.trainer.data.check_source_shape``); a missing blend file or
    unreadable data is one :class:`~moe_cpt.errors.CptError` here. A mixer service is not contacted
    (the workers check what it serves)."""
    d, t = cfg.data, cfg.training
    if d.kind != "mixer" or d.service_url:
        return
    from moe_cpt.mixer.dataset import open_blend
    from moe_cpt.trainer.data import check_source_shape

    resumed = is_resume(cfg.run.output_dir) and recorded_blend(record)
    spec: Any = resumed or d.blend
    blend, _ = open_blend(spec)
    g = t.global_batch_size
    source = SimpleNamespace(seq_len=blend.spec.seq_len, global_batch_size=blend.spec.global_batch_size,
                             blend=blend)
    check_source_shape(source, what=f"blend {d.blend}", seq_len=t.seq_len,
                       global_batch_size=g if g > 0 else t.local_batch_size * cfg.dp_degree(),
                       vocab_size=cfg.vocab_size())


def launch(config_path: str | None, overrides: Sequence[str], *, dry_run: bool = False,
           log_path: str | None = None) -> int:
    """Run the training job; returns torchrun's exit code, or :data:`EXIT_PREEMPTED` when the
    run stopped on ``SIGUSR1`` after checkpointing. ``log_path``: also write the processes'
    output there (stdout/stderr otherwise inherited)."""
    cfg = load_config(config_path, list(overrides))  # fail fast, before starting processes
    run = cfg.run  # resume / CPT parent: its recorded dataset versions must be readable
    record = check_run_inputs(run.output_dir, run.phase, run.parent_run_dir)
    check_checkpoint(run.output_dir, run.phase, run.parent_run_dir, run.parent_step,
                     trust=run.trust_checkpoint)
    nproc = cfg.parallel.nproc
    cmd = torchrun_command(config_path, overrides, nproc)
    if dry_run:
        print(" ".join(cmd))
        return 0
    check_data_source(cfg, record)
    check_free(run.output_dir)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    if log_path is None:
        rc = _run_torchrun(cmd, env, None)
    else:
        with open(log_path, "w") as log:
            rc = _run_torchrun(cmd, env, log)
    if rc == 0 and read_run_record(run.output_dir).get("status") == "preempted":
        return EXIT_PREEMPTED
    return rc


def _run_torchrun(cmd: list[str], env: dict[str, str], log: IO[str] | None) -> int:
    """``torchrun`` as a child that dies with this process and ignores ``SIGUSR1``; a
    ``SIGUSR1`` to this process goes to the workers."""
    out = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}
    proc = subprocess.Popen(cmd, env=env, preexec_fn=child_preexec(os.getpid(), (PREEMPT_SIGNAL,)),  # noqa: PLW1509
                            **out)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(PREEMPT_SIGNAL, lambda signum, frame: forward_signal(signum, proc.pid)) \
        if main else None
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()  # e.g. Ctrl-C: torchrun stops its workers
        proc.wait()
        raise
    finally:
        if main:
            signal.signal(PREEMPT_SIGNAL, previous)
