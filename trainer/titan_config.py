"""The run config (:class:`moe_cpt.trainer.config.CptConfig`) as torchtitan's ``Trainer.Config``:
``CptTrainer.Config`` built from our sections, then the ``torchtitan:`` pass-through sections
set on it (:mod:`moe_cpt.trainer.titan_sections`)."""

from __future__ import annotations

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.optimizer import default_adamw
from torchtitan.config import DebugConfig, ParallelismConfig, TrainingConfig

from moe_cpt.errors import ConfigError
from moe_cpt.trainer import cpu_compat
from moe_cpt.trainer.config import CptConfig
from moe_cpt.trainer.data import CptDataLoader, NullTokenizer
from moe_cpt.trainer.models import model_spec
from moe_cpt.trainer.schedules import lr_scheduler_config
from moe_cpt.trainer.step_metrics import StepMetrics
from moe_cpt.trainer.titan_sections import apply_sections
from moe_cpt.trainer.train import CptTrainer


def to_trainer_config(cfg: CptConfig) -> CptTrainer.Config:
    """Build the ``CptTrainer.Config`` (a torchtitan ``Trainer.Config``)."""
    m, d, t, p = cfg.model, cfg.data, cfg.training, cfg.parallel
    vocab = cfg.vocab_size()
    spec = model_spec(
        m.flavor, router=m.router, attention=m.attention, aux_loss_coeff=m.aux_loss_coeff,
        z_loss_coeff=m.z_loss_coeff, load_balance_coeff=m.load_balance_coeff, vocab_size=vocab,
        sinkhorn_tol=m.sinkhorn_tol, sinkhorn_max_iters=m.sinkhorn_max_iters,
        route_norm=m.route_norm,
    )
    training = TrainingConfig(local_batch_size=t.local_batch_size,
                              global_batch_size=t.global_batch_size, seq_len=t.seq_len,
                              steps=t.steps, max_norm=t.max_norm,
                              mixed_precision_param=t.mixed_precision_param)
    parallelism = ParallelismConfig(data_parallel_shard_degree=p.dp_shard,
                                    expert_parallel_degree=p.ep)
    kwargs = dict(
        model_spec=spec,
        dump_folder=cfg.run.output_dir,
        tokenizer=NullTokenizer.Config(vocab_size=vocab),
        dataloader=CptDataLoader.Config(kind=d.kind, blend=d.blend, seed=d.seed, vocab_size=vocab,
                                        weights=list(d.weights), service_url=d.service_url,
                                        service_token_env=d.service_token_env),
        loss=CrossEntropyLoss.Config(),
        optimizer=default_adamw(lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay),
        lr_scheduler=lr_scheduler_config(cfg.schedule),
        metrics=StepMetrics.Config(log_freq=cfg.metrics.log_freq,
                                   enable_tensorboard=cfg.metrics.tensorboard,
                                   disable_color_printing=True),
        training=training,
        parallelism=parallelism,
        checkpoint=CheckpointManager.Config(enable=cfg.checkpoint.enable,
                                            interval=cfg.checkpoint.interval,
                                            keep_latest_k=cfg.checkpoint.keep_latest_k,
                                            last_save_model_only=False,
                                            initial_load_model_only=False),  # CPT sets both
        activation_checkpoint=None,  # default: none at these sizes (torchtitan.activation_checkpoint)
        debug=DebugConfig(seed=t.seed, deterministic=t.deterministic),
        run=cfg.run,
        evaluation=cfg.eval,
        user_config=cfg.to_dict(),
    )
    apply_sections(kwargs, cfg.torchtitan)
    cpu_compat.adapt_config(kwargs["training"], kwargs["parallelism"])
    try:
        return CptTrainer.Config(**kwargs)
    except ValueError as exc:  # torchtitan's cross-section checks (e.g. AC needs compile)
        raise ConfigError(f"torchtitan: {str(exc).strip().splitlines()[0]}") from exc
