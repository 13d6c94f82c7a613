"""``CptTrainer``: torchtitan's ``Trainer`` plus what the study needs.

Additions (each a small override of a torchtitan extension point):
* router aux/z losses added to the LM loss (``_forward_backward_body``);
* per-document attention masks for the SDPA backend (``post_dataloading_process``);
* seeded unsharded init + the experts-differ guard (CPU init bug);
* CPT phase: start from a parent run's checkpoint (weights, optionally optimizer) with a fresh
  LR schedule, the parent recorded in ``run.json``;
* per-step JSONL (``steps.jsonl``) with the MRI / MaxVio of every MoE layer (from the counts
  torchtitan's MoE layer keeps), per-log-step ``train`` rows and per-eval ``eval`` rows in
  ``metrics.jsonl`` (and TensorBoard);
* global data accounting (tokens per source, a DP-layout-independent data fingerprint) and
  per-source training loss;
* validation per source distribution (loss, router balance and MRI, routing saturation vs the
  run's start) and, in CPT runs, forgetting (val loss now minus at the CPT start);
* on resume / CPT start: the recorded dataset versions must still be readable, and a resumed
  mixer-fed run reuses the resolved blend of its ``run.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import spmd_types as spmd
import torch
import torch.nn.functional as F
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from moe_cpt.errors import ConfigError
from moe_cpt.provenance.lineage import check_readable
from moe_cpt.provenance.record import RunRecorder, read_run_record
from moe_cpt.provenance.schema import new_run_id
from moe_cpt.trainer import checkpoint_trust, cpu_compat, init_guard, signals
from moe_cpt.trainer.attention import DocumentSDPA, document_causal_mask
from moe_cpt.trainer.config import EvalSection, RunSection
from moe_cpt.trainer.console import quiet_cpu_noise
from moe_cpt.trainer.data import rebase_positions
from moe_cpt.trainer.data_source import DataSource
from moe_cpt.trainer.evaluation import (
    EvalResult,
    evaluate,
    local_tensor,
    routing_change,
    routing_saturation,
)
from moe_cpt.trainer.resume import (
    check_checkpoint,
    is_resume,
    latest_step,
    recorded_blend,
    warn_parent_inputs,
)
from moe_cpt.trainer.routers import collect_router_losses
from moe_cpt.trainer.routing_metrics import MoECounts


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class CptTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        run: RunSection = field(default_factory=RunSection)
        evaluation: EvalSection = field(default_factory=EvalSection)
        user_config: dict = field(default_factory=dict)  # the resolved run config, plain data

    config: Config

    def __init__(self, config: Config) -> None:
        quiet_cpu_noise(seeded_init=config.run.init_from_full)
        cpu_compat.apply()
        cpu_compat.adapt_config(config.training, config.parallelism)
        config.dataloader.global_batch_size = config.training.global_batch_size  # type: ignore[attr-defined]
        self._resuming = is_resume(config.dump_folder, config.checkpoint.folder)
        self._parent: dict[str, Any] = {}
        if self._resuming:
            self._setup_resume(config)
        if config.run.phase == "cpt":
            self._setup_cpt(config)
        trusted = check_checkpoint(config.dump_folder, config.run.phase, config.run.parent_run_dir,
                                   config.run.parent_step, config.checkpoint.folder,
                                   trust=config.run.trust_checkpoint)  # before anything unpickles
        if self._resuming:
            config.checkpoint.load_step = trusted  # exactly the checked one
        self._preempt = signals.PreemptionRequest().install()  # SIGUSR1: checkpoint + requeue
        self._digests: dict[str, dict[str, str]] = {}
        super().__init__(config)
        self.metrics_processor.total_steps = config.training.steps  # the progress line's N
        self.metrics_processor.defer_console = True  # _log_step_metrics prints the line
        model = self.model_parts[0]
        if config.run.init_from_full:  # also when resuming: the checkpoint overwrites it
            init_guard.init_from_full(model, self.model_config, config.debug.seed or 0)
        self.experts_distinct = init_guard.experts_distinct(model)
        if not self.experts_distinct:
            raise RuntimeError(
                "experts are identical after init (DTensor CPU init bug); "
                "set run.init_from_full=true"
            )
        first_attention = getattr(self.model_config, "first_attention", None)
        self._doc_mask = isinstance(
            getattr(first_attention, "inner_attention", None), DocumentSDPA.Config
        )
        if config.run.phase == "cpt" and not self._resuming and config.run.load_optimizer:
            self.checkpointer.exclude_from_loading = ["dataloader", "lr_scheduler", "train_state"]
        self._router_stats: list[dict[str, float]] = []
        self._moe_counts = MoECounts(model)
        self._tokens_per_source = np.zeros(self.dataloader.num_sources, dtype=np.int64)
        # per-source train loss of the current step: [loss sums..., token counts...]
        self._source_loss = torch.zeros(2 * self.dataloader.num_sources, dtype=torch.float64,
                                        device=self.device)
        self._mb_sources: np.ndarray | None = None
        self._val_at_start: dict[str, float] = {}
        self._val_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # fixed
        self._checkpoints: list[int] = []
        self._out = Path(config.dump_folder)
        self._tb: Any = None

    # ---- setup helpers -------------------------------------------------------------------
    def _setup_resume(self, config: Config) -> None:
        """Resume: the recorded inputs must be readable; a mixer run keeps its resolved blend
        (pinned versions) even if the spec's refs moved since."""
        record = read_run_record(config.dump_folder)
        check_readable(record)
        blend = recorded_blend(record)
        if blend and config.dataloader.kind == "mixer":  # type: ignore[attr-defined]
            config.dataloader.resolved_blend = blend  # type: ignore[attr-defined]
            if _rank() == 0:
                versions = ", ".join(f"{x['dataset']}@{x['version']}" for x in blend["sources"])
                logger.info(f"resuming on the recorded blend {blend.get('fingerprint')} "
                            f"({versions}), not re-resolving data.blend")

    def _setup_cpt(self, config: Config) -> None:
        parent = Path(config.run.parent_run_dir)
        if not parent.is_dir():
            raise ConfigError(f"run.parent_run_dir {parent} does not exist")
        ckpt_dir = parent / config.checkpoint.folder
        step = config.run.parent_step if config.run.parent_step >= 0 else latest_step(ckpt_dir)
        path = ckpt_dir / f"step-{step}"
        if step < 0 or not path.is_dir():
            raise ConfigError(f"no checkpoint step-{step} under {ckpt_dir}")
        config.checkpoint.enable = True
        config.checkpoint.initial_load_path = str(path)
        config.checkpoint.initial_load_model_only = not config.run.load_optimizer
        record = read_run_record(parent)
        if not self._resuming:
            warn_parent_inputs(record)
        self._parent = {"run_id": record.get("run_id", ""), "run_dir": str(parent),
                        "checkpoint": str(path), "step": step,
                        "load_optimizer": config.run.load_optimizer}

    # ---- torchtitan overrides ------------------------------------------------------------
    def post_dataloading_process(self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor):
        pending = getattr(self.dataloader, "pending_sources", None)
        self._mb_sources = pending.popleft() if pending else None
        inputs, labels, extra = super().post_dataloading_process(input_dict, labels)
        if self._doc_mask and extra.get("positions") is not None:
            extra["attention_masks"] = document_causal_mask(extra["positions"])
        return inputs, labels, extra

    def _forward_backward_body(self, inputs, labels, global_valid_tokens, extra_kwargs):
        model = self.model_parts[0]
        with self.train_context():
            pred = model(inputs, **extra_kwargs)
            self._moe_counts.snapshot()
            loss_kwargs = {}
            if "positions" in extra_kwargs:
                loss_kwargs["positions"] = extra_kwargs["positions"]
            loss, _ = self.loss_fn(pred, labels, global_valid_tokens, **loss_kwargs)
            self._accumulate_source_loss(pred, labels)
            del pred
            router_loss, stats = collect_router_losses(model)
            total = loss
            if stats:
                self._router_stats.append(stats)
            if router_loss is not None:
                # token-weighted mean over ranks/microbatches, like the LM loss
                total = loss + router_loss * (labels.numel() / global_valid_tokens)
            with spmd.no_typecheck():
                total.backward()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "tokens_per_source": torch.from_numpy(self._tokens_per_source.copy())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "tokens_per_source" in state_dict:
            self._tokens_per_source = state_dict["tokens_per_source"].numpy().astype(np.int64)

    # ---- data accounting -----------------------------------------------------------------
    @torch.no_grad()
    def _accumulate_source_loss(self, pred: torch.Tensor, labels: torch.Tensor) -> None:
        """Add this microbatch's per-sample loss sums / token counts to their sources."""
        sources = self._mb_sources
        self._mb_sources = None
        logits, labels = local_tensor(pred).detach(), local_tensor(labels)
        if sources is None or logits.dim() != 3 or len(sources) != logits.shape[0]:
            return
        batch, vocab = logits.shape[0], logits.shape[-1]
        flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
        chunk = max(1, (1 << 27) // vocab)  # <= 512 MiB of float32 logits at a time
        token_loss = torch.cat([
            F.cross_entropy(flat[i:i + chunk].float(), flat_labels[i:i + chunk],
                            ignore_index=IGNORE_INDEX, reduction="none")
            for i in range(0, flat.shape[0], chunk)])
        sums = token_loss.reshape(batch, -1).sum(-1)
        counts = (labels != IGNORE_INDEX).sum(-1)
        index = torch.from_numpy(sources).to(self._source_loss.device)
        k = self.dataloader.num_sources
        self._source_loss[:k].index_add_(0, index, sums.double())
        self._source_loss[k:].index_add_(0, index, counts.double())

    def _reduce_data_counters(self) -> tuple[np.ndarray, int, dict[str, float]]:
        """Global (all DP ranks) tokens per source, data fingerprint, and the step's metrics:
        mean train loss per source and the MRI / MaxVio of each MoE layer."""
        loader = self.dataloader
        local = np.concatenate([loader.tokens_per_source, [loader.fingerprint]])
        loader.tokens_per_source[:] = 0
        loader.fingerprint = 0
        t = torch.from_numpy(local.astype(np.int64)).to(self.device)
        k = loader.num_sources
        # one float64 all-reduce: per-source loss sums and counts, then expert counts
        counts_le = self._moe_counts.take()
        floats = self._source_loss.clone()
        if counts_le is not None:
            floats = torch.cat([floats, counts_le.to(floats).reshape(-1)])
        self._source_loss.zero_()
        if self.parallel_dims.dp_enabled:
            group = self.parallel_dims.get_mesh("batch").get_group()
            torch.distributed.all_reduce(t, group=group)
            torch.distributed.all_reduce(floats, group=group)
        values = t.cpu().numpy()
        floats_np = floats.cpu().numpy()
        sums, counts = floats_np[:k], floats_np[k:2 * k]
        metrics = {f"loss/{name}": float(sums[i] / counts[i])
                   for i, name in enumerate(loader.source.source_names) if counts[i] > 0}
        if counts_le is not None:
            metrics.update(self._moe_counts.step_metrics(
                floats_np[2 * k:].reshape(counts_le.shape)))
        return values[:-1], int(values[-1]), metrics

    # ---- evaluation ----------------------------------------------------------------------
    def _val_batches(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out batch of each source. A source whose held-out split is missing
        or holds fewer than ``eval.samples_per_source`` windows is skipped with a warning; the
        batches must be equal on all ranks (the model is sharded), so a short split is not
        used partially. Built once per run (the batches are fixed)."""
        if self._val_cache is not None:
            return self._val_cache
        self._val_cache = batches = {}
        source: DataSource = self.dataloader.source
        n = self.config.evaluation.samples_per_source
        if n <= 0:
            return batches
        for i, name in enumerate(source.source_names):
            samples = source.validation_samples(i, n)
            if len(samples) < n:
                if _rank() == 0:
                    logger.warning(
                        f"validation: source {name!r} has {len(samples)} held-out windows, "
                        f"fewer than eval.samples_per_source={n}; no validation metrics for it "
                        "(raise the blend's holdout_tokens or lower eval.samples_per_source)")
                continue
            tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples])).to(self.device)
            positions = rebase_positions(
                torch.from_numpy(np.stack([s["positions"] for s in samples]))).to(self.device)
            batches[name] = (tokens, positions)
        return batches

    def _eval_kwargs(self, positions: torch.Tensor) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"positions": positions}
        if self._doc_mask:
            kwargs["attention_masks"] = document_causal_mask(positions)
        return kwargs

    def _evaluate(self) -> EvalResult:
        return evaluate(self.model_parts[0], self._val_batches(), self._eval_kwargs,
                        batch_size=self.config.evaluation.batch_size)

    def _save_routing(self, result: EvalResult, step: int) -> None:
        if _rank() == 0 and result.routing:
            folder = self._out / "routing"
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / f"step-{step}.npz", **result.routing)

    # ---- logging -------------------------------------------------------------------------
    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one row, tagged with the run segment (start or restart) that wrote it: a
        resumed segment repeats the steps after its checkpoint, and readers keep the last
        segment's row of each step (:func:`moe_cpt.provenance.logs.read_rows`)."""
        if _rank() != 0:
            return
        with open(self._out / name, "a") as f:
            f.write(json.dumps({**record, "segment": len(self._segments) - 1}) + "\n")

    def _tensorboard(self, record: dict[str, Any], step: int) -> None:
        if _rank() != 0 or not self.config.metrics.enable_tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
                return
            self._tb = SummaryWriter(str(self._out / "tb"))
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def _write_record(self, start_step: int, status: str) -> None:
        if _rank() != 0:
            return
        previous = self._recorder.previous
        cfg = self.config
        record = {
            "run_id": self._run_id,
            "name": cfg.run.name or previous.get("name", ""),
            "phase": cfg.run.phase,
            "parent_run_id": self._parent.get("run_id") or previous.get("parent_run_id", ""),
            "parent": self._parent or previous.get("parent", {}),
            "config": cfg.user_config,
            "model": {"flavor": cfg.model_spec.flavor if cfg.model_spec else ""},
            "data": self.dataloader.describe(),
            "start_step": previous.get("start_step", start_step),
            "segments": self._segments,
            "end_step": self.step,
            "status": status,
            "tokens_per_source": dict(zip(self.dataloader.source.source_names,
                                          (int(x) for x in self._tokens_per_source), strict=True)),
            "checkpoints": sorted(set(previous.get("checkpoints", [])) | set(self._checkpoints)),
            checkpoint_trust.DIGEST_KEY: {**previous.get(checkpoint_trust.DIGEST_KEY, {}),
                                          **self._digests},
            "experts_distinct_after_init": self.experts_distinct,
            "val_loss_at_start": self._val_at_start,
            "cpu_compat": not cpu_compat.cuda_present(),
        }
        self._recorder.write(record)

    def _saved_checkpoint(self) -> None:
        """A checkpoint of this step was written: rank 0 digests its files for run.json."""
        self._checkpoints.append(self.step)
        if _rank() == 0:
            step_dir = self._out / self.config.checkpoint.folder / f"step-{self.step}"
            self._digests[str(self.step)] = checkpoint_trust.saved_digests(step_dir)

    def _stop_preempted(self, start_step: int) -> None:
        """SIGUSR1 (Slurm's pre-timeout signal, trainer/signals.py): checkpoint this step,
        record the run as preempted, requeue the Slurm job."""
        if self.step not in self._checkpoints and self.checkpointer.save(self.step, last_step=True):
            self._saved_checkpoint()
        self._write_record(start_step, "preempted")
        if _rank() == 0:
            requeued = signals.requeue_job()
            logger.warning(f"preempted at step {self.step}: checkpoint written"
                           + (", Slurm job requeued" if requeued else ""))
        if self._tb:
            self._tb.close()

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> None:  # noqa: C901 - mirrors torchtitan's loop
        cfg = self.config
        self._out.mkdir(parents=True, exist_ok=True)
        self._recorder = RunRecorder(self._out)  # the record so far (a resumed run's)
        previous = self._recorder.previous
        self._run_id = previous.get("run_id") or cfg.run.run_id or new_run_id()
        self.checkpointer.load(step=cfg.checkpoint.load_step)
        if cfg.run.phase == "cpt" and not self._resuming and cfg.run.load_optimizer:
            for sched in self.lr_schedulers.schedulers:  # optimizer load restored parent LRs
                for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
                    group["lr"] = lr
        start_step = self.step
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self._segments = previous.get("segments", []) + [
            {"start_step": start_step, "world_size": world,
             "dp_size": self.parallel_dims.dp_shard * self.parallel_dims.dp_replicate,
             "ep_size": self.parallel_dims.ep}]
        self._val_at_start = dict(previous.get("val_loss_at_start") or {})
        self._write_record(start_step, "running")

        reference = None
        if cfg.evaluation.reference_routing:
            with np.load(cfg.evaluation.reference_routing) as ref:
                reference = {k: ref[k] for k in ref.files}
        result = self._evaluate()
        self._save_routing(result, self.step)
        if reference is None:
            reference = result.routing
        if not self._val_at_start:  # first eval of the run (kept across restarts)
            self._val_at_start = dict(result.val_loss)
        self._log_eval(result, reference, train_window=None)

        data_iterator = self.batch_generator(self.dataloader)
        window: list[dict[str, Any]] = []
        while self.should_continue_training():
            self.step += 1
            self.gc_handler.run(self.step)
            t0 = time.perf_counter()
            try:
                self.train_step(data_iterator)
            except DataloaderExhaustedError:
                break
            tokens, fingerprint, step_metrics = self._reduce_data_counters()
            self._tokens_per_source += tokens
            step_record = {"step": self.step, **self.metrics_processor.last,
                           "wall_s": time.perf_counter() - t0,
                           "data_fingerprint": fingerprint,
                           "tokens": int(tokens.sum()),
                           "tokens_by_source": [int(x) for x in tokens],
                           **step_metrics}
            self._log_step_metrics(step_metrics)
            if self._router_stats:
                for key in ("aux_loss", "z_loss"):
                    step_record[key] = float(np.mean([s[key] for s in self._router_stats]))
                self._router_stats.clear()
            window.append(step_record)
            self._append_jsonl("steps.jsonl", step_record)
            if self.checkpointer.save(self.step, last_step=(self.step == cfg.training.steps)):
                self._saved_checkpoint()
            is_last = self.step == cfg.training.steps
            if is_last or (cfg.evaluation.interval and self.step % cfg.evaluation.interval == 0):
                result = self._evaluate()
                self._save_routing(result, self.step)
                self._log_eval(result, reference, train_window=window)
                window = []
            self._write_record(start_step, "running")
            if self.step - start_step == 1:
                dist_utils.set_pg_timeouts(
                    timeout=timedelta(seconds=cfg.comm.train_timeout_seconds),
                    parallel_dims=self.parallel_dims,
                )
            if cfg.run.fail_at_step and self.step == cfg.run.fail_at_step:
                os._exit(17)  # simulated crash: no cleanup, no final checkpoint
            if self._preempt.agreed(self.device):
                self._stop_preempted(start_step)
                return
        self._write_record(start_step, "finished")
        if self._tb:
            self._tb.close()

    def _window_source_loss(self, window: list[dict[str, Any]]) -> dict[str, float]:
        """Token-weighted mean train loss per source over the steps of an eval window."""
        out: dict[str, float] = {}
        for i, name in enumerate(self.dataloader.source.source_names):
            pairs = [(r[f"loss/{name}"], r["tokens_by_source"][i]) for r in window
                     if f"loss/{name}" in r]
            weight = sum(w for _, w in pairs)
            if weight:
                out[f"train/loss/{name}"] = float(sum(v * w for v, w in pairs) / weight)
        return out

    def _log_step_metrics(self, metrics: dict[str, float]) -> None:
        """Per-source train loss and router MRI/MaxVio of the step: TensorBoard every step,
        and at each log step a ``train`` row of ``metrics.jsonl`` and one console line."""
        if _rank() != 0:
            return
        if metrics:
            self._tensorboard(metrics, self.step)
        if self.metrics_processor.should_log(self.step):
            if metrics:
                self._append_jsonl("metrics.jsonl", {"kind": "train", "step": self.step,
                                                     "loss": self.metrics_processor.last.get("loss"),
                                                     **metrics})
            shown = {k: v for k, v in metrics.items()
                     if k.startswith("loss/") or k == "router/mri_max"}
            text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
            logger.info("  ".join(x for x in (self.metrics_processor.progress, text) if x))

    def _log_eval(
        self, result: EvalResult, reference: dict[str, np.ndarray] | None,
        train_window: list[dict[str, Any]] | None,
    ) -> None:
        record: dict[str, Any] = {"kind": "eval", "step": self.step, **result.metrics()}
        if self.config.run.phase == "cpt":
            for name, loss in result.val_loss.items():
                if name in self._val_at_start:
                    record[f"forgetting/{name}"] = loss - self._val_at_start[name]
        if reference is not None and result.routing:
            for k, v in routing_change(result.routing, reference).items():
                record[f"routing_change/{k}"] = v
            record.update(routing_saturation(result, reference))
        if train_window:
            keys = ("loss", "aux_loss", "z_loss", "tokens_per_s_per_rank", "step_time_s",
                    "data_wait_pct")
            for key in keys:
                vals = [r[key] for r in train_window if key in r]
                if vals:
                    record[f"train/{key}"] = float(np.mean(vals))
            record.update(self._window_source_loss(train_window))
            lr = [v for k, v in train_window[-1].items() if k.startswith("lr/")]
            if lr:
                record["train/lr"] = lr[0]
        self._append_jsonl("metrics.jsonl", record)
        self._tensorboard(record, self.step)
        if self._tb:  # per eval; the writer flushes per-step scalars on its own schedule
            self._tb.flush()
        if _rank() == 0:
            brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
                     if not isinstance(v, list)}
            print(f"[eval] {brief}", flush=True)

