"""What the console shows on CPU: torchtitan's GPU-only log lines are noise there.

Without CUDA, torchtitan still looks for GPUs with ``lspci`` (to pick the peak FLOPS for MFU),
falls back to an A100's peak, reports the model's device memory as ``-0.00GiB`` and warns that
it overrides NCCL environment variables that gloo never reads. :func:`quiet_cpu_noise` drops
exactly those records (by message) from torchtitan's logger, and the DTensor warnings about
random ops on a CPU mesh when the seeded unsharded init (``run.init_from_full``,
:mod:`moe_cpt.trainer.init_guard`) makes them moot. Every other record and warning passes; with CUDA
nothing is dropped.
"""

from __future__ import annotations

import logging
import warnings

from torchtitan.tools.logging import logger

from moe_cpt.trainer.cpu_compat import cuda_present

# message prefixes of torchtitan's records that carry no information without CUDA
CPU_NOISE = (
    "Error running lspci",  # tools/utils.py:get_peak_flops
    "Peak flops undefined for: cpu",  # idem, then an A100's peak is assumed
    "Peak FLOPS used for computing MFU",  # trainer.py: that assumed peak
    "CPU memory usage for model",  # trainer.py: device memory of a CPU "device" (-0.00GiB)
    "ENV[TORCH_NCCL_",  # distributed/utils.py: NCCL variables, unused by gloo
)
DTENSOR_CPU_RNG = r"DTensor (random operators|manual_seed\(\)) may not have complete support on cpu"


class CpuNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CPU_NOISE)


def quiet_cpu_noise(*, seeded_init: bool) -> None:
    """Without CUDA: drop :data:`CPU_NOISE` from torchtitan's logger (once per process), and,
    with the seeded unsharded init, the DTensor CPU random-op warnings."""
    if cuda_present():
        return
    if not any(isinstance(f, CpuNoiseFilter) for f in logger.filters):
        logger.addFilter(CpuNoiseFilter())
    if seeded_init:
        warnings.filterwarnings("ignore", message=DTENSOR_CPU_RNG, category=UserWarning)
