"""trainer: torchtitan-based dense/MoE training for the study (see docs/trainer.md).

Importing the package applies the CPU adaptations of :mod:`trainer.cpu_compat` when no CUDA
device is present: torchtitan's MoE modules import triton at import time, so the patch has to
be in place before any ``torchtitan.models`` import.
"""

from trainer import cpu_compat

cpu_compat.apply()
