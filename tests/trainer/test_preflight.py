"""Config problems are one ``cpt: error:`` line from ``cpt train`` before torchrun starts, with
nothing written to the output folder (issue 11.12), and trainer config values have their types
(issue 11.13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moe_cpt.errors import ConfigError, CptError
from moe_cpt.trainer.config import load_config
from moe_cpt.trainer.launcher import launch
from tests.support.languages import VOCAB, lang_a, publish_language, write_blend

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "trainer" / "configs" / "tiny_moe.yaml"


@pytest.fixture(scope="module")
def blend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("preflight")
    store = str(root / "store")
    publish_language(store, "lang_a", lang_a, 60, seed=1)
    return write_blend(root / "blend.yaml", store, {"lang_a": 1.0}, seq_len=64, global_batch_size=4)


def _cpt_train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_cpt.cli", "train", str(CONFIG), f"run.output_dir={out}",
                           "data.kind=mixer", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("overrides, message", [
    (["training.seq_len=32", "training.global_batch_size=4", f"model.vocab_size={VOCAB}"],
     "has seq_len 64 but training.seq_len is 32"),
    (["training.global_batch_size=8", f"model.vocab_size={VOCAB}"],
     "has global batch size 4; set training.global_batch_size=4"),
    (["training.global_batch_size=4", "model.vocab_size=100"],
     "vocabulary of 256 tokens, more than the model's 100"),
], ids=["seq_len", "global_batch", "vocab"])
def test_data_mismatches_are_refused_before_torchrun(blend: Path, tmp_path: Path, overrides: list[str],
                                                     message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as info:
        launch(str(CONFIG), [f"run.output_dir={out}", "data.kind=mixer", f"data.blend={blend}", *overrides])
    assert "\n" not in str(info.value) and not out.exists()


def test_cpt_train_prints_one_line_for_a_missing_blend(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _cpt_train(out, f"data.blend={tmp_path / 'no-such-blend.yaml'}", "training.global_batch_size=4")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpt: error:") and "no-such-blend.yaml" in lines[0], \
        done.stderr[-3000:]
    assert "ChildFailedError" not in done.stderr and not out.exists()


@pytest.mark.parametrize("override, message", [
    ("training.steps=x", "'training.steps' must be an integer, not 'x'"),
    ("parallel.nproc=2.5", "'parallel.nproc' must be an integer, not 2.5"),
    ("checkpoint.enable=1", "'checkpoint.enable' must be true or false"),
    ("optimizer.lr=fast", "'optimizer.lr' must be a number"),
    ("model.vocab_size=big", "'model.vocab_size' must be an integer or null"),
    ("model.route_norm=1", "'model.route_norm' must be true or false or null"),
    ("run.output_dir=[1]", "'run.output_dir' must be a string"),
    ("data.weights=3", "'data.weights' must be a list"),
    ("data.weights=[a,1]", "'data.weights' must be a list of numbers"),
    ("training=5", "'training' must be a mapping"),
])
def test_wrong_value_types_name_the_key_and_the_type(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")) as info:
        load_config(CONFIG, [override])
    assert "\n" not in str(info.value)


def test_numbers_in_yaml_forms_and_nulls_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, ["optimizer.lr=1e-4", "training.max_norm=1", "model.vocab_size=null",
                               "model.aux_loss_coeff=0.02"])
    assert cfg["optimizer"]["lr"] == pytest.approx(1e-4) and cfg["training"]["max_norm"] == 1
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(CptError, match="top level must be a mapping"):
        load_config(top)
