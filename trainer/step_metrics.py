"""torchtitan's MetricsProcessor, keeping each logged step's values for the trainer's JSONL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtitan.components.metrics import MetricsProcessor


class StepMetrics(MetricsProcessor):
    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.last: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

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
        try:
            super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        finally:
            self.logger = inner
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
