"""`cpt bench corpus`: tokens/s per core of our pipeline vs raw `tokenizers` vs datatrove's tokenizer.

All three run on one core (``RAYON_NUM_THREADS=1``, one task, one worker) over the same JSONL
file (the embedded demo's `code` + `prose` text) with the same tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _texts(raw: Path) -> list[str]:
    from corpus.demo import write_raw_inputs

    write_raw_inputs(raw)
    texts = [json.loads(line)["text"] for f in sorted((raw / "prose").glob("*.jsonl")) for line in f.open()]
    texts += [p.read_text(encoding="utf-8") for p in sorted((raw / "code").rglob("*.py"))]
    return [t for t in texts if t.strip()]


def bench_corpus(raw_dir: str = "data/raw", repeat: int = 1) -> list[dict]:
    os.environ["RAYON_NUM_THREADS"] = "1"  # per-core numbers; must precede the first encode
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from tokenizers import Tokenizer

    from corpus.build import build_dataset
    from corpus.config import load_config
    from corpus.demo import ensure_tokenizer

    console = Console(stderr=True)
    raw = Path(raw_dir).resolve()
    texts = _texts(raw)
    tok_path = ensure_tokenizer(raw, console)
    tok = Tokenizer.from_file(str(tok_path))
    work = Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    (work / "in").mkdir()
    with open(work / "in" / "docs.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    nbytes = sum(len(t.encode()) for t in texts)
    console.print(f"bench corpus: {len(texts)} docs, {nbytes / 1e6:.1f} MB, tokenizer {tok_path.name}")

    rows = []
    # 1. raw tokenizers batch encode: the physical limit of the tokenize stage
    best = float("inf")
    n_tokens = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(texts), 256):
            for enc in tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=False):
                n_tokens += len(enc.ids) + 1
        best = min(best, time.perf_counter() - t0)
    rows.append({"what": "raw tokenizers encode_batch_fast", "tokens": n_tokens, "seconds": best})

    # 2. ours: read -> clean -> tokenize -> zstd shards + index (no dedup), and with dedup
    cfg_path = work / "c.yaml"
    cfg_path.write_text(json.dumps({"name": "bench", "inputs": [str(work / "in")], "tokenizer": str(tok_path),
                                    "tasks": 1, "dedup": {"exact": False, "minhash": {"enabled": False}}}))
    from corpus.config import ExecutorConfig

    for label, overrides in (("moe-cpt pipeline (read+clean+tokenize+shard)", {}),
                             ("moe-cpt pipeline + exact & MinHash dedup", {"dedup": {"exact": True, "minhash": {"enabled": True}}})):
        best = float("inf")
        for r in range(repeat):
            cfg = load_config(cfg_path, {**overrides, "name": f"bench{r}{len(rows)}"})
            store = work / f"store{len(rows)}-{r}"
            t0 = time.perf_counter()
            result = build_dataset(cfg, str(store), ExecutorConfig(workers=1))
            best = min(best, time.perf_counter() - t0)
        rows.append({"what": label, "tokens": result.manifest.n_tokens, "seconds": best})

    # 3. datatrove's own DocumentTokenizer on the same input
    best = float("inf")
    for r in range(repeat):
        out = work / f"dt-{r}"
        ex = LocalPipelineExecutor(
            pipeline=[JsonlReader(str(work / "in")),
                      DocumentTokenizer(str(out), tokenizer_name_or_path=str(tok_path), eos_token="<|endoftext|>",
                                        shuffle_documents=False)],
            tasks=1, workers=1, logging_dir=str(work / f"dt-logs-{r}"))
        t0 = time.perf_counter()
        ex.run()
        best = min(best, time.perf_counter() - t0)
    dt_tokens = sum(os.path.getsize(p) for p in out.rglob("*.ds")) // 2
    rows.append({"what": "datatrove DocumentTokenizer", "tokens": dt_tokens, "seconds": best})
    return rows


def print_table(rows: list[dict]) -> None:
    raw = rows[0]["tokens"] / rows[0]["seconds"]
    table = Table(title="corpus tokenize throughput, 1 core")
    for col in ("pipeline", "tokens", "seconds", "tokens/s/core", "vs raw tokenizer"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        table.add_row(r["what"], f"{r['tokens']:,}", f"{r['seconds']:.2f}", f"{rate:,.0f}", f"{rate / raw:.2f}x")
    Console().print(table)
    ours, dt = rows[1]["tokens"] / rows[1]["seconds"], rows[-1]["tokens"] / rows[-1]["seconds"]
    Console().print(f"moe-cpt / raw tokenizer = {ours / raw:.2f} (target >= 0.80); "
                    f"moe-cpt / datatrove DocumentTokenizer = {ours / dt:.2f} (target > 1)")
