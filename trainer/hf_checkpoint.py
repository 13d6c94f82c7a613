"""Hugging Face checkpoints in and out: a released Qwen3 / Qwen3-MoE model as a CPT parent run,
and any run's checkpoint as a model ``transformers`` loads.

``import_hf(HF_DIR, OUT_RUN_DIR)`` turns a local model folder (``config.json``, ``*.safetensors``,
``tokenizer.json``) into a *parent run* that a CPT phase starts from (``run.phase: cpt``,
``run.parent_run_dir: OUT_RUN_DIR``, ``model.flavor: hf:OUT_RUN_DIR/hf``):

* ``OUT_RUN_DIR/hf/``: the model's ``config.json`` and tokenizer files, copied (the flavor,
  i.e. the model shape, is derived from this ``config.json``: :mod:`moe_cpt.trainer.hf_config`);
* ``OUT_RUN_DIR/checkpoint/step-0``: a torch DCP checkpoint (float32) of our model (the keys the
  trainer saves and loads), converted with torchtitan's ``Qwen3StateDictAdapter`` (HF <->
  torchtitan names, per-expert <-> grouped expert tensors). Our attention fuses q/k/v into one
  ``wqkv`` (``fuse_qkv=True``); torchtitan's ``FusedQKVLinear`` exposes it in ``state_dict()``
  as the stock ``wq``/``wk``/``wv`` that the adapter maps, and merges them back on load (its
  state-dict hooks), so a checkpoint holds ``wq``/``wk``/``wv`` and no key is hand-mapped.
  Keys and shapes are checked against our model built on the meta device; the import needs
  memory for the HF weights plus their float32 copy (no model is materialized). MoE layers get
  a zero ``expert_bias_E`` (what an ``aux_free`` router adds to its routing scores; HF has
  none), so a CPT phase may use any ``model.router``;
* ``OUT_RUN_DIR/run.json``: a run record (``phase: import``) holding the SHA-256 digests of the
  checkpoint's files (loading is refused without them: :mod:`moe_cpt.trainer.checkpoint_trust`), the
  source folder and the digests of its files, and the tokenizer (path + sha256).

``export_hf(RUN_DIR[@STEP], OUT_DIR)`` writes ``model.safetensors`` + ``config.json`` (+ the
tokenizer files of an imported model) that ``transformers`` loads as ``Qwen3MoeForCausalLM`` /
``Qwen3ForCausalLM``. The checkpoint is verified against its run record before it is read (DCP
unpickles). Weights are exported in float32 (the trainer's parameter dtype).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

from moe_cpt.errors import ConfigError, NotFoundError
from moe_cpt.hashing import sha256_hex
from moe_cpt.provenance.record import read_run_record, write_run_record
from moe_cpt.provenance.schema import new_run_id
from moe_cpt.trainer import checkpoint_trust
from moe_cpt.trainer.hf_config import HF_CONFIG, hf_config_of, read_hf_config, shape_fields
from moe_cpt.trainer.models import (
    HF_FLAVOR_PREFIX,
    build_model_config,
    default_route_norm,
    shape_of,
)
from moe_cpt.trainer.resume import CHECKPOINT_FOLDER, latest_step

HF_FOLDER = "hf"  # inside an imported run: the model's config.json + tokenizer files
TOKENIZER = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")
WEIGHTS = "model.safetensors"
EXPERT_BIAS = "expert_bias_E"  # aux_free routers' balancing bias (a persistent MoE buffer)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    run_dir: Path
    flavor: str  # model.flavor of a CPT config that continues from it
    parameters: int
    tokenizer: Path


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    step: int
    architecture: str
    parameters: int


def _empty_target(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not an empty folder")


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise NotFoundError(f"{hf_dir} holds no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for i, f in enumerate(files):
        log.info("reading %s (%d/%d)", f.name, i + 1, len(files))
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = st.get_tensor(key)
    return out


def _unfuse_experts(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors (the released checkpoints' layout, which the adapter maps) from the
    fused ``mlp.experts.gate_up_proj`` ``(E, 2F, D)`` / ``down_proj`` ``(E, D, F)`` layout that
    some ``transformers`` versions save."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_sd.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value
    return out


def _build_model(flavor: str, **kwargs: Any) -> torch.nn.Module:
    model = build_model_config(flavor, **kwargs).build()
    return model.to(torch.float32)


def _adapter(model_config: Any) -> Qwen3StateDictAdapter:
    return Qwen3StateDictAdapter(model_config, None)


def hf_to_state_dict(hf_sd: dict[str, torch.Tensor], flavor: str, tied: bool
                     ) -> dict[str, torch.Tensor]:
    """The checkpoint state dict (float32; the keys and shapes of our model's ``state_dict()``,
    i.e. what the trainer saves and loads) of a HF Qwen3 / Qwen3-MoE state dict. Checked
    against our model built on the meta device (no memory), so no model is materialized."""
    model_config = build_model_config(flavor, router="aux_loss")
    hf_sd = _unfuse_experts(hf_sd)
    if "lm_head.weight" not in hf_sd:
        if not tied:
            raise ConfigError("the weights have no lm_head.weight and tie_word_embeddings is false")
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]  # untied from here on
    try:
        sd = _adapter(model_config).from_hf(hf_sd)
    except KeyError as exc:
        raise ConfigError(f"weight {exc} has no counterpart in a Qwen3 model") from exc
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_config.build().state_dict().items()}
        free = build_model_config(flavor, router="aux_free").build().state_dict()
    for key, value in free.items():  # so that a CPT phase may pick any router: HF has no bias
        if key.endswith(EXPERT_BIAS) and key not in sd:
            sd[key] = torch.zeros(value.shape, dtype=torch.float32)
            expected[key] = tuple(value.shape)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        what = ([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
                + [f"{k} is {tuple(sd[k].shape)}, not {expected[k]}" for k in wrong[:2]])
        raise ConfigError(f"the weights do not fit config.json: {'; '.join(what)}")
    return {k: v.to(torch.float32).contiguous() for k, v in sd.items()}


def model_to_hf(model: torch.nn.Module, model_config: Any) -> dict[str, torch.Tensor]:
    """The HF state dict (contiguous float32 CPU tensors) of our model."""
    sd = _adapter(model_config).to_hf(model.state_dict())
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def _digest_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_hex(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def import_hf(hf_dir: str | Path, out_run_dir: str | Path, *, name: str = "") -> ImportResult:
    """Convert a local HF Qwen3 / Qwen3-MoE model folder into a parent run (module doc)."""
    src, out = Path(hf_dir).resolve(), Path(out_run_dir).resolve()
    cfg = read_hf_config(src)
    shape_fields(cfg)  # refuse what we cannot represent before writing anything
    if not (src / TOKENIZER).is_file():
        raise NotFoundError(f"{src} has no {TOKENIZER} (the tokenizer is part of the model)")
    _empty_target(out)
    hf_sd = _read_safetensors(src)
    (out / HF_FOLDER).mkdir(parents=True, exist_ok=True)
    for fname in (HF_CONFIG, *TOKENIZER_FILES):
        if (src / fname).is_file():
            shutil.copyfile(src / fname, out / HF_FOLDER / fname)
    flavor = f"{HF_FLAVOR_PREFIX}{out / HF_FOLDER}"
    state = hf_to_state_dict(hf_sd, flavor, tied=bool(cfg.get("tie_word_embeddings", False)))
    del hf_sd
    step_dir = out / CHECKPOINT_FOLDER / "step-0"
    log.info("writing %s", step_dir)
    dcp.save(state, checkpoint_id=str(step_dir))
    tokenizer = out / HF_FOLDER / TOKENIZER
    shape = shape_of(flavor)
    record: dict[str, Any] = {
        "run_id": new_run_id(), "name": name or src.name, "phase": "import",
        "parent_run_id": "", "parent": {},
        "config": {"model": {"flavor": flavor, "router": "aux_loss", "route_norm": None,
                             "vocab_size": None}},
        "model": {"flavor": flavor, "hf_model_type": cfg["model_type"],
                  "route_norm": shape.route_norm},
        "source": {"kind": "huggingface", "dir": str(src), "sha256": _digest_files(src)},
        "tokenizer": {"path": str(tokenizer), "sha256": sha256_hex(tokenizer.read_bytes())},
        "start_step": 0, "end_step": 0, "status": "finished", "checkpoints": [0],
        checkpoint_trust.DIGEST_KEY: {"0": checkpoint_trust.saved_digests(step_dir)},
    }
    write_run_record(out, record)
    return ImportResult(run_dir=out, flavor=flavor,
                        parameters=sum(v.numel() for v in state.values()), tokenizer=tokenizer)


def parse_run_step(text: str) -> tuple[Path, int]:
    """``RUN_DIR[@STEP]`` -> (run folder, step; -1 = latest)."""
    head, sep, tail = text.rpartition("@")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(text), -1


def _model_settings(record: dict[str, Any]) -> dict[str, Any]:
    m = (record.get("config") or {}).get("model") or {}
    flavor = m.get("flavor") or (record.get("model") or {}).get("flavor")
    if not flavor:
        raise ConfigError("the run record names no model flavor")
    return {"flavor": flavor, "router": m.get("router") or "aux_loss",
            "route_norm": m.get("route_norm"), "vocab_size": m.get("vocab_size")}


def load_run_model(run_dir: Path, step: int, *, trust: bool = False
                   ) -> tuple[torch.nn.Module, Any, dict[str, Any], int]:
    """(model, its config, model settings, step) of checkpoint ``step`` (-1: latest) of a run,
    after checking the checkpoint's files against the run record."""
    record = read_run_record(run_dir)
    if not record:
        raise NotFoundError(f"{run_dir} has no run record (run.json)")
    folder = run_dir / CHECKPOINT_FOLDER
    step = step if step >= 0 else latest_step(folder)
    step_dir = folder / f"step-{step}"
    if step < 0 or not (step_dir / ".metadata").is_file():
        raise NotFoundError(f"no checkpoint {'step-' + str(step) if step >= 0 else ''} under {folder}")
    checkpoint_trust.verify_checkpoint(step_dir, step, record, run_dir / "run.json", trust=trust)
    settings = _model_settings(record)
    kwargs = {k: settings[k] for k in ("router", "route_norm", "vocab_size")}
    model_config = build_model_config(settings["flavor"], **kwargs)
    model = _build_model(settings["flavor"], **kwargs)
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=str(step_dir))
    model.load_state_dict(sd, strict=True)
    return model, model_config, settings, step


def export_hf(run: str, out_dir: str | Path, *, trust: bool = False) -> ExportResult:
    """Write a run's checkpoint as a ``transformers`` model folder (module doc)."""
    run_dir, step = parse_run_step(run)
    out = Path(out_dir)
    _empty_target(out)
    log.info("reading %s (checkpoint %s)", run_dir, "latest" if step < 0 else f"step-{step}")
    model, model_config, settings, step = load_run_model(run_dir, step, trust=trust)
    for name, buf in model.named_buffers():
        if name.endswith(EXPERT_BIAS) and bool(buf.abs().sum() > 0):
            raise ConfigError("this run's routers learned an expert bias (model.router=aux_free), "
                              "which Qwen3-MoE has no place for; it cannot be exported exactly")
    shape = shape_of(settings["flavor"])
    if settings["vocab_size"]:
        shape = replace(shape, vocab_size=int(settings["vocab_size"]))
    route_norm = settings["route_norm"]
    if route_norm is None:
        route_norm = shape.route_norm if shape.route_norm is not None else default_route_norm(shape.top_k)
    flavor = settings["flavor"]
    hf_dir = Path(flavor[len(HF_FLAVOR_PREFIX):]) if flavor.startswith(HF_FLAVOR_PREFIX) else None
    base = read_hf_config(hf_dir) if hf_dir is not None else None
    config = hf_config_of(shape, route_norm, base)
    config["dtype"] = "float32"  # the weights written (transformers 5's key)
    if "torch_dtype" in config:  # 4.x's key, from an imported model's config
        config["torch_dtype"] = "float32"
    hf_sd = model_to_hf(model, model_config)
    out.mkdir(parents=True, exist_ok=True)
    log.info("writing %s", out / WEIGHTS)
    save_file(hf_sd, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if hf_dir is not None:
        for fname in TOKENIZER_FILES:
            if (hf_dir / fname).is_file():
                shutil.copyfile(hf_dir / fname, out / fname)
    return ExportResult(out_dir=out, step=step, architecture=config["architectures"][0],
                        parameters=sum(v.numel() for v in hf_sd.values()))
