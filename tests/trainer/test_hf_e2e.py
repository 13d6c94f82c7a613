"""End to end from a released-model folder: a tiny random Qwen3-MoE / Qwen3 built with
`transformers` is imported (`cpt checkpoint import-hf`), the demo's prose and code are built into
a store with *its* tokenizer (`cpt corpus build`, ``tokenizer:`` = the imported tokenizer.json),
a short CPT phase runs from the imported parent on a mixer blend of code with prose replay (real
`torchrun`, 2 gloo processes), and the result is exported (`cpt checkpoint export-hf`) and
reloaded with `transformers`: its logits equal our model's."""

from __future__ import annotations

import json
import pydoc_data.topics
import shutil
import sysconfig
from pathlib import Path

import pytest
import yaml

from moe_cpt.cli import main
from moe_cpt.hashing import sha256_hex
from moe_cpt.store import open_dataset
from moe_cpt.trainer.hf_checkpoint import load_run_model
from moe_cpt.trainer.launcher import launch
from tests.support.languages import write_blend
from tests.trainer.hf_models import (
    TOLERANCE,
    hf_logits,
    load_hf,
    max_abs_diff,
    our_logits,
    sample_tokens,
    save_tiny_model,
)

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny_moe.yaml"
STEPS = 3
CODE_FILES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py",
              "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py")


def _write_demo_inputs(raw: Path, tokenizer: Path) -> list[Path]:
    """A small slice of the demo's two datasets (corpus/demo.py): prose = the Python
    documentation topics, code = some standard-library modules; both tokenized with the
    imported model's tokenizer."""
    (raw / "prose").mkdir(parents=True)
    with open(raw / "prose" / "topics.jsonl", "w", encoding="utf-8") as f:
        for name, text in sorted(pydoc_data.topics.topics.items())[:80]:
            f.write(json.dumps({"id": f"pydoc:{name}", "text": text}) + "\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in CODE_FILES:
        (raw / "code" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib / rel, raw / "code" / rel)
    configs = []
    for name, source in (("prose", {"url": "prose", "format": "jsonl"}),
                         ("code", {"url": "code", "format": "text", "glob": "**/*.py"})):
        cfg = {"name": name, "inputs": [source], "tokenizer": str(tokenizer), "tasks": 1,
               "packing": {"block_tokens": 8192, "shard_bytes": 65536}}
        path = raw / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        configs.append(path)
    return configs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_e2e")


@pytest.fixture(scope="module", params=("moe", "dense"))
def imported(request: pytest.FixtureRequest, root: Path) -> tuple[str, Path, Path]:
    kind = request.param
    hf_dir = save_tiny_model(root / f"hf_{kind}", kind, seed=3)
    run = root / f"parent_{kind}"
    assert main(["checkpoint", "import-hf", str(hf_dir), str(run)]) == 0
    return kind, hf_dir, run


@pytest.fixture(scope="module")
def store(root: Path, imported: tuple[str, Path, Path]) -> str:
    """The demo slice built once with the imported tokenizer (same tokenizer for both kinds)."""
    url = str(root / "store")
    if not (root / "raw").exists():
        tokenizer = imported[2] / "hf" / "tokenizer.json"
        for cfg in _write_demo_inputs(root / "raw", tokenizer):
            assert main(["corpus", "build", str(cfg), "--store", url, "--workers", "1"]) == 0
    return url


def test_corpus_build_uses_the_imported_tokenizer(imported, store: str) -> None:
    _, hf_dir, run = imported
    recorded = json.loads((run / "run.json").read_text())["tokenizer"]
    assert recorded["sha256"] == sha256_hex((hf_dir / "tokenizer.json").read_bytes())
    for name in ("prose", "code"):
        manifest = open_dataset(store, f"{name}@latest").manifest
        assert manifest.tokenizer.sha256 == recorded["sha256"]
        assert manifest.tokenizer.vocab_size <= 320 and manifest.n_docs > 0


def test_cpt_from_imported_parent_then_export(imported, store: str, root: Path) -> None:
    kind, hf_dir, parent = imported
    blend = write_blend(root / f"blend_{kind}.yaml", store, {"code": 0.8, "prose": 0.2},
                        holdout_tokens=300)
    out = root / f"cpt_{kind}"
    flavor = json.loads((parent / "run.json").read_text())["model"]["flavor"]
    log = root / f"cpt_{kind}.log"
    rc = launch(str(CONFIG), [
        f"run.output_dir={out}", f"model.flavor={flavor}", "data.kind=mixer",
        f"data.blend={blend}", "run.phase=cpt", f"run.parent_run_dir={parent}",
        f"training.steps={STEPS}", f"checkpoint.interval={STEPS}", "eval.interval=0",
        "schedule.warmup_steps=1", f"parallel.ep={2 if kind == 'moe' else 1}",
    ], log_path=str(log))
    assert rc == 0, log.read_text()[-6000:]

    record = json.loads((out / "run.json").read_text())
    parent_record = json.loads((parent / "run.json").read_text())
    assert record["phase"] == "cpt" and record["status"] == "finished"
    assert record["parent_run_id"] == parent_record["run_id"] and record["parent"]["step"] == 0
    assert record["tokens_per_source"]["code"] > 0 and record["tokens_per_source"]["prose"] > 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in evals if e.get("kind") == "eval" and e["step"] == 0)
    assert start["val_loss/code"] > 0

    # the CPT start is the imported model: the parent's logits are the HF model's
    tokens = sample_tokens(seed=4)
    parent_model, *_ = load_run_model(parent, 0)
    original = hf_logits(load_hf(hf_dir), tokens)
    assert max_abs_diff(our_logits(parent_model, tokens), original, f"parent {kind}") < TOLERANCE

    exported = root / f"export_{kind}"
    assert main(["checkpoint", "export-hf", f"{out}@{STEPS}", str(exported)]) == 0
    trained, *_ = load_run_model(out, STEPS)
    ours = our_logits(trained, tokens)
    assert max_abs_diff(ours, hf_logits(load_hf(exported), tokens), f"export {kind}") < TOLERANCE
    assert float((ours - original).abs().max()) > 100 * TOLERANCE  # training moved the weights
