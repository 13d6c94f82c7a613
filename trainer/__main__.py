"""``python -m trainer CONFIG [k=v ...]`` / ``torchrun --nproc-per-node N -m trainer ...``."""

import sys

from trainer.worker import main

sys.exit(main())
