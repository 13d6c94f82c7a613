"""The embedded demo: two real datasets from text every Python installation ships.

* ``prose``: the Python documentation topics in ``pydoc_data`` and the docstrings of the standard
  library (extracted with ``ast``; nothing is imported or executed), one JSONL record per topic
  or module;
* ``code``: the standard library sources (tests excluded), one document per file.

Plus a byte-level BPE tokenizer trained on both. This pair is the "pre-train on A (prose),
continue on B (code) with replay of A" scenario the mixer and trainer use.
"""

from __future__ import annotations

import ast
import json
import shutil
import sysconfig
from pathlib import Path

from rich.console import Console

from moe_cpt.corpus.config import ExecutorConfig
from moe_cpt.corpus.progress import run_build
from moe_cpt.corpus.tokenizer import train_bpe
from moe_cpt.fs import atomic_write_file
from moe_cpt.store.tokenizer import read_tokenizer_bytes

DEMO_VOCAB = 8192
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

PROSE_CONFIG = """\
# Demo dataset A: English prose from the Python documentation (written by `cpt corpus demo`).
name: prose
inputs:
  - {url: prose, format: jsonl}
tokenizer: tokenizer.json
tasks: 2
clean: {min_chars: 32}
packing: {block_tokens: 65536, shard_bytes: 4194304}
"""

CODE_CONFIG = """\
# Demo dataset B: Python standard library sources (written by `cpt corpus demo`).
name: code
inputs:
  - {url: code, format: text, glob: "**/*.py"}
tokenizer: tokenizer.json
tasks: 2
clean: {min_chars: 32}
packing: {block_tokens: 65536, shard_bytes: 8388608}
"""


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(path)
    return files


def module_docstrings(path: Path) -> str | None:
    """All docstrings of one module (module, classes, functions), as one document."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                title = getattr(node, "name", None)
                parts.append(f"{title}\n\n{doc}" if title else doc)
    return "\n\n".join(parts) if parts else None


def write_raw_inputs(raw: Path) -> None:
    """Write ``raw/prose/*.jsonl`` and ``raw/code/**/*.py`` (idempotent, deterministic)."""
    import pydoc_data.topics  # 700 KB of text: loaded only when the demo inputs are written

    prose = raw / "prose"
    code = raw / "code"
    if (raw / ".complete").exists():
        return
    shutil.rmtree(raw, ignore_errors=True)
    prose.mkdir(parents=True)
    with open(prose / "topics.jsonl", "w", encoding="utf-8") as f:
        for name, text in sorted(pydoc_data.topics.topics.items()):
            f.write(json.dumps({"id": f"pydoc:{name}", "text": text}) + "\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = stdlib_sources()
    with open(prose / "docstrings.jsonl", "w", encoding="utf-8") as f:
        for path in sources:
            text = module_docstrings(path)
            if text:
                f.write(json.dumps({"id": f"docstrings:{path.relative_to(stdlib)}", "text": text}) + "\n")
    for path in sources:
        dest = code / path.relative_to(stdlib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    (raw / "prose.yaml").write_text(PROSE_CONFIG)
    (raw / "code.yaml").write_text(CODE_CONFIG)
    (raw / ".complete").write_text("ok\n")


def ensure_tokenizer(raw: Path, console: Console) -> Path:
    path = raw / "tokenizer.json"
    if path.exists():
        return path
    from moe_cpt.corpus.config import load_config
    from moe_cpt.corpus.training_text import iter_config_texts

    console.print(f"training a byte-level BPE tokenizer (vocab {DEMO_VOCAB}) on prose + code ...")
    texts = (t for name in ("prose", "code") for t in iter_config_texts(load_config(raw / f"{name}.yaml")))
    data = train_bpe(texts, DEMO_VOCAB)
    atomic_write_file(path, data)
    return path


def build_demo(store_url: str, raw_dir: str, workers: int) -> None:
    console = Console(stderr=True)
    raw = Path(raw_dir).resolve()
    console.print(f"writing demo inputs to {raw} ...")
    write_raw_inputs(raw)
    tok = ensure_tokenizer(raw, console)
    read_tokenizer_bytes(str(tok))  # fail early with a clear message if unreadable
    executor = ExecutorConfig(kind="local", workers=workers)
    for name in ("prose", "code"):
        run_build(str(raw / f"{name}.yaml"), store_url, workers, executor, keep_work=False, console=console)
    console.print(f"\ndone: `cpt corpus ls --store {store_url}` lists the versions")
