"""torchtitan's MetricsProcessor, keeping each logged step's values for the trainer's JSONL and
printing one progress line per log step instead of torchtitan's.

The line (rank 0's console, :func:`progress_line`)::

    step 3/20  loss 5.5213  grad_norm 1.2042  tok/s 2,345  elapsed 0:00:04  ETA 0:00:23

``tok/s`` is the whole job's (all ranks) training throughput over the last log window; the ETA
is the mean step time since this segment's first logged step times the steps left. With CUDA
the line also carries torchtitan's peak memory and MFU; on CPU both are meaningless
(``memory: -0.00GiB``, ``mfu 0.00%``) and left out (the other CPU noise: :mod:`moe_cpt.trainer.console`).
The trainer appends its per-source losses and router balance to the same line
(``defer_console``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from moe_cpt.trainer.cpu_compat import cuda_present


class _DropConsoleLine(logging.Filter):
    """Drops torchtitan's own console line (``components/metrics.py``, ``log``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return not (path.endswith("torchtitan/components/metrics.py") and record.funcName == "log"
                    and record.levelno == logging.INFO)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


def progress_line(*, step: int, total: int, loss: float, grad_norm: float, tokens_per_s: float,
                  elapsed_s: float, eta_s: float | None, extra: str = "") -> str:
    """The console line of one log step."""
    eta = _clock(eta_s) if eta_s is not None else "?"
    return (f"step {step}/{total}  loss {loss:.4f}  grad_norm {grad_norm:.4f}  "
            f"tok/s {tokens_per_s:,.0f}  elapsed {_clock(elapsed_s)}  ETA {eta}{extra}")


class StepMetrics(MetricsProcessor):
    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.last: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.total_steps = 0  # set by the trainer (training.steps)
        self._start: tuple[int, float] | None = None  # (first logged step, its time)
        self._created = time.perf_counter()
        self.defer_console = False  # True: the trainer prints ``progress`` (with its own keys)
        self.progress = ""  # the progress line of the last log step

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        captured: dict[str, float] = {}

        class _Tap:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def log(self, metrics: dict[str, Any], step: int) -> None:
                captured.update(metrics)
                self.inner.log(metrics, step)

            def close(self) -> None:
                self.inner.close()

        inner = self.logger
        self.logger = _Tap(inner)
        quiet = _DropConsoleLine()
        logger.addFilter(quiet)
        try:
            super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        finally:
            self.logger = inner
            logger.removeFilter(quiet)
        self.last = {
            "loss": float(global_avg_loss),
            "grad_norm": float(grad_norm),
            "tokens_per_s_per_rank": float(captured.get("throughput(tps)", 0.0)),
            "step_time_s": float(captured.get("time_metrics/end_to_end(s)", 0.0)),
            "data_wait_pct": float(captured.get("time_metrics/data_loading(%)", 0.0)),
            **{k: float(v) for k, v in (extra_metrics or {}).items()
               if isinstance(v, (int, float))},
        }
        self.history.append({"step": step, **self.last})
        self.progress = self._progress(step, captured)
        if not self.defer_console:
            logger.info(self.progress)

    def _progress(self, step: int, captured: dict[str, Any]) -> str:
        now = time.perf_counter()
        if self._start is None:
            self._start = (step, now)
        first, since = self._start
        total = self.total_steps or step
        left = max(0, total - step)
        if step > first:
            eta: float | None = (now - since) / (step - first) * left
        else:
            eta = self.last["step_time_s"] * left if self.last["step_time_s"] else None
        extra = ""
        if cuda_present():
            extra = (f"  memory {captured.get('memory/max_reserved(GiB)', 0.0):.2f}GiB"
                     f"({captured.get('memory/max_reserved(%)', 0.0):.0f}%)")
            if "mfu(%)" in captured:
                extra += f"  mfu {captured['mfu(%)']:.2f}%"
        world = self.parallel_dims.world_size
        return progress_line(step=step, total=total, loss=self.last["loss"],
                             grad_norm=self.last["grad_norm"],
                             tokens_per_s=self.last["tokens_per_s_per_rank"] * world,
                             elapsed_s=now - self._created, eta_s=eta, extra=extra)
