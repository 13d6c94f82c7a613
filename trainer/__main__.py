"""``python -m moe_cpt.trainer CONFIG [k=v ...]`` / ``torchrun --nproc-per-node N -m moe_cpt.trainer ...``."""

import sys

from moe_cpt.trainer.worker import main

sys.exit(main())
