"""trainer: torchtitan-based dense/MoE training for the study (see docs/trainer.md).

Importing the package registers a stub for torchtitan's triton kernels when triton is not
installed (:func:`moe_cpt.trainer.cpu_compat.stub_triton_kernels_if_missing`): torchtitan's MoE modules
import them at import time. This is cheap (no torch import); the device patches of
:mod:`moe_cpt.trainer.cpu_compat` are applied by the trainer itself (``cpu_compat.apply()``).
"""

from moe_cpt.trainer import cpu_compat

cpu_compat.stub_triton_kernels_if_missing()
