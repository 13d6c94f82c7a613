"""One benchmark training job (run under torchrun by :mod:`moe_cpt.bench.train_bench`).

``python -m moe_cpt.bench.train_bench_worker {ours|torchtitan} OUT.json STEPS SEQ_LEN LOCAL_BATCH EP``

* ``torchtitan``: torchtitan's own ``qwen3_moe_debug`` config (its ``Trainer``, its qwen3
  ``debugmodel_moe`` model spec, its optimizer), with only what CPU and the shared data need:
  the :mod:`moe_cpt.trainer.cpu_compat` patches, SDPA instead of flex attention (no CPU backward), the
  synthetic data source, no checkpointing/activation checkpointing.
* ``ours``: :class:`moe_cpt.trainer.train.CptTrainer` with the ``tt_debug_moe`` flavor (same shape),
  the aux-loss-free router (torchtitan's routing) and the same data/optimizer settings.

Both call :func:`moe_cpt.trainer.cpu_compat.apply` first, so on CPU both models' routed experts (the
same torchtitan ``GroupedExperts`` class) run their grouped matmuls in fp32 (cpu_compat (j)).

Rank 0 writes the per-step metrics (tokens/s, step time, data-wait %) to ``OUT.json``.
"""

from __future__ import annotations

import json
import sys

import torch

import moe_cpt.trainer  # noqa: F401  (CPU compat before torchtitan model imports)
from moe_cpt.trainer import cpu_compat


def _common(config, seq_len: int, local_batch: int, steps: int, ep: int) -> None:
    from moe_cpt.trainer.data import CptDataLoader, NullTokenizer
    from moe_cpt.trainer.step_metrics import StepMetrics

    vocab = config.model_spec.model.vocab_size
    config.tokenizer = NullTokenizer.Config(vocab_size=vocab)
    config.dataloader = CptDataLoader.Config(vocab_size=vocab, seed=0)
    config.metrics = StepMetrics.Config(log_freq=1, disable_color_printing=True)
    config.training.seq_len = seq_len
    config.training.local_batch_size = local_batch
    config.training.steps = steps
    config.training.mixed_precision_param = "float32"
    config.parallelism.expert_parallel_degree = ep
    config.checkpoint.enable = False
    config.activation_checkpoint = None
    config.validator.enable = False
    cpu_compat.adapt_config(config.training, config.parallelism)


def torchtitan_config(steps: int, seq_len: int, local_batch: int, ep: int):
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    from moe_cpt.trainer.attention import DocumentSDPA
    from moe_cpt.trainer.models import parallelize_cpt

    config = qwen3_moe_debug()
    for layer in config.model_spec.model.layers:
        layer.attention.inner_attention = DocumentSDPA.Config()  # flex: no CPU backward
    if not cpu_compat.cuda_present():
        config.model_spec.parallelize_fn = parallelize_cpt  # stock qwen3 + SUM reductions (g)
    from torchtitan.components.loss import CrossEntropyLoss

    config.loss = CrossEntropyLoss.Config()
    _common(config, seq_len, local_batch, steps, ep)
    return config


def ours_config(steps: int, seq_len: int, local_batch: int, ep: int):
    from torchtitan.components.optimizer import default_adamw

    from moe_cpt.trainer.config import load_config
    from moe_cpt.trainer.titan_config import to_trainer_config

    cfg = load_config(None, [
        "model.flavor=tt_debug_moe", "model.router=aux_free", f"training.steps={steps}",
        f"training.seq_len={seq_len}", f"training.local_batch_size={local_batch}",
        f"parallel.ep={ep}", "checkpoint.enable=false", "eval.samples_per_source=1",
        "run.output_dir=/tmp/cpt-bench-ours", "metrics.tensorboard=false",
    ])
    config = to_trainer_config(cfg)
    config.optimizer = default_adamw(lr=3e-4)  # as torchtitan's qwen3_moe_debug
    _common(config, seq_len, local_batch, steps, ep)
    return config


def main(argv: list[str]) -> int:
    cpu_compat.apply()
    which, out = argv[0], argv[1]
    steps, seq_len, local_batch, ep = (int(x) for x in argv[2:6])
    build = torchtitan_config if which == "torchtitan" else ours_config
    config = build(steps, seq_len, local_batch, ep)
    t = config.build()
    try:
        t.train()
        if torch.distributed.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(t.metrics_processor.history, f)
    finally:
        t.close()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
