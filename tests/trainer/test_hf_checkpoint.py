"""`cpt checkpoint import-hf / export-hf` on tiny random Qwen3 / Qwen3-MoE models built with
`transformers`: our model's logits equal the HF model's after import and after export, configs
we cannot represent are refused with one line, and the checkpoint trust rules hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from moe_cpt.cli import main
from moe_cpt.errors import ConfigError, NotFoundError
from moe_cpt.provenance.record import write_run_record
from moe_cpt.trainer.checkpoint_trust import UntrustedCheckpointError, saved_digests
from moe_cpt.trainer.config import load_config
from moe_cpt.trainer.hf_checkpoint import export_hf, import_hf, load_run_model, parse_run_step
from moe_cpt.trainer.models import build_model_config, shape_of
from tests.trainer.hf_models import (
    TOLERANCE,
    hf_logits,
    load_hf,
    max_abs_diff,
    our_logits,
    sample_tokens,
    save_tiny_model,
)

KINDS = ("moe", "dense")


@pytest.fixture(scope="module", params=KINDS)
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf_dir = save_tiny_model(root / "hf_model", request.param)
    result = import_hf(hf_dir, root / "parent")
    return request.param, hf_dir, result


def test_import_logits_match_hf(imported) -> None:
    kind, hf_dir, result = imported
    model, _, settings, step = load_run_model(result.run_dir, -1)  # digests checked
    assert step == 0 and settings["flavor"] == result.flavor
    tokens = sample_tokens()
    diff = max_abs_diff(our_logits(model, tokens), hf_logits(load_hf(hf_dir), tokens),
                        f"import {kind}")
    assert diff < TOLERANCE


def test_import_records_parent_run(imported) -> None:
    kind, hf_dir, result = imported
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["phase"] == "import" and record["checkpoints"] == [0]
    assert set(record["checkpoint_sha256"]["0"]) >= {".metadata"}
    assert record["tokenizer"]["path"] == str(result.tokenizer) and result.tokenizer.is_file()
    assert record["source"]["dir"] == str(hf_dir.resolve())
    shape = shape_of(result.flavor)
    assert shape.is_moe == (kind == "moe") and shape.rope_theta == 10_000.0
    assert shape.norm_eps == 1e-5
    if kind == "moe":
        assert (shape.num_experts, shape.top_k, shape.moe_hidden, shape.route_norm) == (4, 2, 48, True)
    # a CPT config can name the imported shape as its flavor
    cfg = load_config(None, [f"model.flavor={result.flavor}", "run.phase=cpt",
                             f"run.parent_run_dir={result.run_dir}", "parallel.ep=1"])
    assert cfg["model"]["flavor"] == result.flavor


def test_export_roundtrip_loads_in_transformers(imported, tmp_path: Path) -> None:
    kind, _, result = imported
    out = tmp_path / "export"
    exported = export_hf(f"{result.run_dir}@0", out)
    hf = load_hf(out)
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if kind == "moe" else "Qwen3ForCausalLM")
    assert exported.architecture == type(hf).__name__ and (out / "tokenizer.json").is_file()
    model, *_ = load_run_model(result.run_dir, 0)
    tokens = sample_tokens(seed=2)
    assert max_abs_diff(our_logits(model, tokens), hf_logits(hf, tokens), f"export {kind}") < TOLERANCE


def test_export_refuses_a_changed_checkpoint(imported, tmp_path: Path) -> None:
    _, _, result = imported
    run = tmp_path / "copy"
    shutil.copytree(result.run_dir, run)
    step = run / "checkpoint" / "step-0"
    victim = next(p for p in sorted(step.iterdir()) if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(UntrustedCheckpointError, match="changed"):
        export_hf(str(run), tmp_path / "out")


@pytest.mark.parametrize(("override", "match"), [
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"mlp_only_layers": [0]}, "mlp_only_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unrepresentable_configs_are_refused(tmp_path: Path, override: dict, match: str) -> None:
    hf_dir = save_tiny_model(tmp_path / "m", "moe", **override)
    with pytest.raises(ConfigError, match=match):
        import_hf(hf_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_missing_tokenizer_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf_dir = save_tiny_model(tmp_path / "m", "dense")
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(NotFoundError, match="tokenizer.json"):
        import_hf(hf_dir, tmp_path / "run")
    capsys.readouterr()  # transformers' save progress
    assert main(["checkpoint", "import-hf", str(tmp_path / "nowhere"), str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpt: error:") and "config.json" in err[0]
    assert main(["checkpoint", "export-hf", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "run.json" in capsys.readouterr().err


def test_parse_run_step() -> None:
    assert parse_run_step("runs/a@12") == (Path("runs/a"), 12)
    assert parse_run_step("runs/a") == (Path("runs/a"), -1)
    assert parse_run_step("runs/x@y") == (Path("runs/x@y"), -1)


def _fake_run(run: Path, flavor: str) -> torch.nn.Module:
    """A run folder holding a random ``flavor`` model as checkpoint step 0, recorded the way the
    trainer records it (config.model + checkpoint_sha256)."""
    torch.manual_seed(0)
    model = build_model_config(flavor).build()
    for p in model.parameters():  # the default init zeroes some weights; make every one count
        if p.dim() >= 2:  # matrices (norm weights stay 1)
            torch.nn.init.normal_(p, std=0.1)
    step = run / "checkpoint" / "step-0"
    dcp.save(model.state_dict(), checkpoint_id=str(step))
    write_run_record(run, {"run_id": "r-" + flavor, "phase": "pretrain",
                           "config": {"model": {"flavor": flavor, "router": "aux_loss"}},
                           "checkpoint_sha256": {"0": saved_digests(step)}, "checkpoints": [0]})
    return model


def test_export_of_a_builtin_flavor(tmp_path: Path) -> None:
    """A run trained from one of our own flavors (not imported) exports too: config.json is
    made from its shape (RoPE theta 1e6, eps 1e-6, route_norm for k=2)."""
    model = _fake_run(tmp_path / "run", "tiny_moe")
    export_hf(str(tmp_path / "run"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["norm_topk_prob"] is True and config["rope_theta"] == 1_000_000.0
    hf = load_hf(tmp_path / "out")
    tokens = sample_tokens(seed=5) % 256  # tiny_moe's vocabulary
    assert max_abs_diff(our_logits(model, tokens), hf_logits(hf, tokens), "export tiny_moe") < TOLERANCE


def test_export_refuses_shared_experts(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run", "tiny_granular")
    with pytest.raises(ConfigError, match="shared experts"):
        export_hf(str(tmp_path / "run"), tmp_path / "out")


def _import_and_compare(hf_dir: Path, run: Path, what: str) -> None:
    import_hf(hf_dir, run)
    model, *_ = load_run_model(run, 0)
    tokens = sample_tokens(seed=6)
    assert max_abs_diff(our_logits(model, tokens), hf_logits(load_hf(hf_dir), tokens), what) < TOLERANCE


def test_tied_embeddings_are_imported_into_the_lm_head(tmp_path: Path) -> None:
    hf_dir = save_tiny_model(tmp_path / "m", "dense", tie_word_embeddings=True)
    _import_and_compare(hf_dir, tmp_path / "run", "import tied dense")


def test_fused_expert_layout_is_imported(tmp_path: Path) -> None:
    """Checkpoints with experts stored fused (``mlp.experts.gate_up_proj`` (E, 2F, D) and
    ``down_proj`` (E, D, F), transformers 5's in-memory layout) import like per-expert ones."""
    hf_dir = save_tiny_model(tmp_path / "m", "moe")
    weights = hf_dir / "model.safetensors"
    sd = load_file(str(weights))
    fused: dict[str, torch.Tensor] = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        per = [{k: sd.pop(f"{prefix}{e}.{k}_proj.weight") for k in ("gate", "up", "down")}
               for e in range(4)]
        fused[f"{prefix}gate_up_proj"] = torch.stack([torch.cat([p["gate"], p["up"]]) for p in per])
        fused[f"{prefix}down_proj"] = torch.stack([p["down"] for p in per])
    save_file({**sd, **fused}, str(hf_dir / "fused.safetensors"))
    weights.rename(tmp_path / "per_expert.safetensors")
    import_hf(hf_dir, tmp_path / "run")
    (hf_dir / "fused.safetensors").unlink()
    (tmp_path / "per_expert.safetensors").rename(weights)  # transformers reads the stock layout
    model, *_ = load_run_model(tmp_path / "run", 0)
    tokens = sample_tokens(seed=7)
    assert max_abs_diff(our_logits(model, tokens), hf_logits(load_hf(hf_dir), tokens),
                        "import fused experts") < TOLERANCE


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    hf_dir = save_tiny_model(tmp_path / "m", "moe")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 32}))
    with pytest.raises(ConfigError, match="do not fit config.json: .*w1_EFD"):
        import_hf(hf_dir, tmp_path / "run")


@pytest.mark.parametrize("imported", ["moe"], indirect=True)  # routers exist in MoE models only
@pytest.mark.parametrize("router", ["aux_free", "sinkhorn"])
def test_imported_checkpoint_loads_for_every_router(imported, router: str) -> None:
    """A CPT phase may pick any model.router: the model-only DCP load the trainer does (the
    model's state_dict keys, read from the checkpoint) finds every key, aux_free's expert bias
    included (zero), and the forward pass is still the HF model's."""
    kind, hf_dir, result = imported
    assert kind == "moe"
    model = build_model_config(result.flavor, router=router).build()
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(result.run_dir / "checkpoint" / "step-0"))
    model.load_state_dict(state)
    biases = [b for n, b in model.named_buffers() if n.endswith("expert_bias_E")]
    assert len(biases) == (2 if router == "aux_free" else 0) and all(not b.any() for b in biases)
    tokens = sample_tokens(seed=8)
    assert max_abs_diff(our_logits(model, tokens), hf_logits(load_hf(hf_dir), tokens),
                        f"import moe, router {router}") < TOLERANCE
