"""The mixer as the trainer's data source, in-process: held-out batches, shape checks, the
service hook, router balance per validation source, and the resume/CPT input checks."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import moe_cpt.trainer  # noqa: F401  (CPU compat before torchtitan model imports)
from moe_cpt.errors import ConfigError, NotFoundError
from moe_cpt.trainer.data import CptDataLoader, build_source
from moe_cpt.trainer.evaluation import evaluate
from moe_cpt.trainer.models import SHAPES, router_config
from moe_cpt.trainer.resume import check_run_inputs, recorded_blend
from moe_cpt.trainer.train import CptTrainer
from tests.support.languages import lang_a, lang_b, publish_language, write_blend


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("trainer_mixer_store")
    url = str(root / "store")
    publish_language(url, "lang_a", lang_a, 120, seed=1)
    publish_language(url, "lang_b", lang_b, 120, seed=2)
    return url


def _cfg(blend: Path | str = "", **kw) -> CptDataLoader.Config:
    return CptDataLoader.Config(kind="mixer", blend=str(blend), vocab_size=256, **kw)


def test_loader_over_mixer_batches_sources_and_resumes(store: str, tmp_path: Path) -> None:
    blend = write_blend(tmp_path / "b.yaml", store, {"lang_a": 0.5, "lang_b": 0.5})
    cfg = _cfg(blend, global_batch_size=4)
    loader = CptDataLoader(cfg, dp_world_size=2, dp_rank=1, seq_len=64, local_batch_size=2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    assert first[0][0]["input"].shape == (2, 64)
    assert len(loader.pending_sources) == 3  # the trainer pops one per forward
    assert loader.tokens_per_source.sum() == 3 * 2 * 64
    state = loader.state_dict()
    assert state["source"]["step"] == 3
    # the state resumes on one rank (elastic): the next local batch of rank 1 at W=2 is the
    # second half of global step 3
    expected = next(it)[0]["input"]
    single = CptDataLoader(cfg, dp_world_size=1, dp_rank=0, seq_len=64, local_batch_size=4)
    single.load_state_dict(state)
    got = next(iter(single))[0]["input"]
    assert torch.equal(got[2:], expected)


def test_short_or_missing_held_out_split_is_skipped_with_warning(
        store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blend = write_blend(tmp_path / "b.yaml", store, {"lang_a": 0.5, "lang_b": 0.5},
                        holdout_tokens=200)  # 3 windows of 64: fewer than 4
    source = build_source(_cfg(blend), seq_len=64, global_batch_size=4, rank=0, world_size=1)
    assert len(source.validation_samples(0, 4)) == 3
    fake = SimpleNamespace(dataloader=SimpleNamespace(source=source), device="cpu",
                           config=SimpleNamespace(evaluation=SimpleNamespace(samples_per_source=4)),
                           _val_cache=None)
    with caplog.at_level(logging.WARNING):
        assert CptTrainer._val_batches(fake) == {}
    assert "source 'lang_a' has 3 held-out windows" in caplog.text
    fake.config.evaluation.samples_per_source = 3
    fake._val_cache = None  # the batches are computed once per run
    batches = CptTrainer._val_batches(fake)
    assert CptTrainer._val_batches(fake) is batches
    assert sorted(batches) == ["lang_a", "lang_b"]
    tokens, positions = batches["lang_b"]
    assert tokens.shape == positions.shape == (3, 65)
    words = tokens[(tokens != 0) & (tokens != 4)]  # not end-of-text / separator
    assert int(words.min()) >= 128  # lang_b's words only

    none = write_blend(tmp_path / "none.yaml", store, {"lang_a": 0.5, "lang_b": 0.5},
                       holdout_tokens=0)
    fake.dataloader.source = build_source(_cfg(none), seq_len=64, global_batch_size=4,
                                          rank=0, world_size=1)
    fake._val_cache = None
    assert CptTrainer._val_batches(fake) == {}


def test_blend_must_match_the_model(store: str, tmp_path: Path) -> None:
    blend = write_blend(tmp_path / "b.yaml", store, {"lang_a": 1.0})
    with pytest.raises(ConfigError, match="seq_len 64 but training.seq_len is 32"):
        build_source(_cfg(blend), seq_len=32, global_batch_size=4, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="training.global_batch_size=4"):
        build_source(_cfg(blend), seq_len=64, global_batch_size=8, rank=0, world_size=1)
    small = CptDataLoader.Config(kind="mixer", blend=str(blend), vocab_size=128)
    with pytest.raises(ConfigError, match="model.vocab_size=256"):
        build_source(small, seq_len=64, global_batch_size=4, rank=0, world_size=1)


def test_service_url_needs_the_client_and_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(service_url="http://127.0.0.1:1", service_token_env="CPT_TEST_NO_SUCH_TOKEN")
    monkeypatch.delenv("CPT_TEST_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="CPT_TEST_NO_SUCH_TOKEN is not set"):
        build_source(cfg, seq_len=64, global_batch_size=4, rank=0, world_size=1)
    monkeypatch.setitem(sys.modules, "moe_cpt.mixer.service.client", None)  # import fails
    monkeypatch.setenv("CPT_TEST_NO_SUCH_TOKEN", "secret")
    with pytest.raises(ConfigError, match="mixer service client is not available"):
        build_source(cfg, seq_len=64, global_batch_size=4, rank=0, world_size=1)


class _ToyMoE(nn.Module):
    """Embedding -> one router (named like a decoder layer's) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        shape = SHAPES["tiny_moe"]
        self.emb = nn.Embedding(256, shape.dim)
        self.head = nn.Linear(shape.dim, 256)
        block = nn.Module()
        block.moe = nn.Module()
        block.moe.router = router_config(shape, "aux_free", aux_loss_coeff=0.0,
                                         z_loss_coeff=0.0).build()
        self.layers = nn.ModuleDict({"0": block})
        torch.manual_seed(0)
        with torch.no_grad():
            self.emb.weight.normal_()
            self.emb.weight[:128] = self.emb.weight[:128].abs()  # low words: all positive
            gate = block.moe.router.gate.weight
            gate.normal_(std=0.1)
            gate[:2] += 1.0  # positive inputs prefer experts 0 and 1

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(tokens)
        self.layers["0"].moe.router(x.reshape(-1, x.shape[-1]))
        return self.head(x)


def test_router_balance_per_validation_source() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randint(2, 128, (2, 17), generator=g)
    high = torch.randint(128, 256, (2, 17), generator=g)
    zeros = torch.zeros_like(low)
    result = evaluate(_ToyMoE(), {"low": (low, zeros), "high": (high, zeros)},
                      lambda positions: {})
    metrics = result.metrics()
    low_f = metrics["router_by_source/low/layers.0/expert_fractions"]
    high_f = metrics["router_by_source/high/layers.0/expert_fractions"]
    assert low_f[:2] == [0.5, 0.5]  # every low token picks experts 0 and 1 (top-2)
    assert metrics["router_by_source/low/layers.0/max_vio"] == pytest.approx(3.0)  # 0.5/(1/8)-1
    assert metrics["router_by_source/high/layers.0/max_vio"] < 3.0
    pooled = np.array(metrics["router/layers.0/expert_fractions"])
    assert np.allclose(pooled, (np.array(low_f) + np.array(high_f)) / 2, atol=1e-5)
    assert set(result.val_loss) == {"low", "high"}


def test_resume_and_cpt_check_the_recorded_versions(store: str, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from moe_cpt.mixer.dataset import MixedDataset

    blend = write_blend(tmp_path / "b.yaml", store, {"lang_a": 1.0})
    ds = MixedDataset(str(blend))
    record = {"run_id": "r1", "data": ds.describe(), "tokens_per_source": {"lang_a": 64}}
    run = tmp_path / "run"
    (run / "checkpoint" / "step-2").mkdir(parents=True)
    (run / "checkpoint" / "step-2" / ".metadata").write_bytes(b"")
    (run / "run.json").write_text(__import__("json").dumps(record))
    assert recorded_blend(check_run_inputs(run, "pretrain", ""))["fingerprint"] == \
        ds.blend.fingerprint
    version_dir = Path(store) / "lang_a" / ds.blend.sources[0].version
    moved = version_dir.with_name("moved-away")
    version_dir.rename(moved)
    try:
        with pytest.raises(NotFoundError, match=f"lang_a@{ds.blend.sources[0].version}"):
            check_run_inputs(run, "pretrain", "")  # resume
        fresh = tmp_path / "cpt"
        with caplog.at_level(logging.WARNING):  # a CPT start needs the parent's checkpoint only
            assert check_run_inputs(fresh, "cpt", str(run))["run_id"] == "r1"
        assert "no longer readable" in caplog.text
        assert check_run_inputs(fresh, "pretrain", "") == {}  # a fresh run checks nothing
    finally:
        moved.rename(version_dir)


def test_service_source_streams_what_the_in_process_mixer_does(
        store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_cpt.mixer.blocks import CacheConfig
    from moe_cpt.mixer.dataset import open_blend
    from moe_cpt.mixer.service.server import MixService, ServiceConfig

    blend = write_blend(tmp_path / "b.yaml", store, {"lang_a": 0.5, "lang_b": 0.5})
    other = write_blend(tmp_path / "other.yaml", store, {"lang_a": 0.5, "lang_b": 0.5}, seed=9)
    monkeypatch.setenv("CPT_TEST_MIX_TOKEN", "s3cret")
    resolved, datasets = open_blend(str(blend))
    with MixService(resolved, datasets, ServiceConfig(port=0, token="s3cret"),
                    CacheConfig(prefetch_threads=1)) as svc:
        remote_cfg = _cfg(blend, service_url=svc.url, service_token_env="CPT_TEST_MIX_TOKEN",
                          global_batch_size=4)
        remote = CptDataLoader(remote_cfg, dp_world_size=2, dp_rank=1, seq_len=64,
                               local_batch_size=2)
        local = CptDataLoader(_cfg(blend, global_batch_size=4), dp_world_size=2, dp_rank=1,
                              seq_len=64, local_batch_size=2)
        r_it, l_it = iter(remote), iter(local)
        for _ in range(3):
            (r_in, r_lab), (l_in, l_lab) = next(r_it), next(l_it)
            assert torch.equal(r_in["input"], l_in["input"])
            assert torch.equal(r_in["positions"], l_in["positions"])
            assert torch.equal(r_lab, l_lab)
        assert [a.tolist() for a in remote.pending_sources] == [
            a.tolist() for a in local.pending_sources]
        assert remote.state_dict() == local.state_dict()
        assert remote.describe()["blend"]["fingerprint"] == resolved.fingerprint
        r_val = remote.source.validation_samples(1, 2)
        l_val = local.source.validation_samples(1, 2)
        assert [s["tokens"].tolist() for s in r_val] == [s["tokens"].tolist() for s in l_val]
        wrong = _cfg(other, service_url=svc.url, service_token_env="CPT_TEST_MIX_TOKEN")
        with pytest.raises(ConfigError, match="mixer service .* serves blend"):
            build_source(wrong, seq_len=64, global_batch_size=4, rank=0, world_size=1)
