"""A Markdown dataset card per version (``cpt corpus show NAME@REF --card [OUT]``).

Everything on the card comes from the version itself: the manifest (inputs, per-stage counts,
tokenizer, config, the optional ``license`` of the config) and the per-document index (documents
and tokens per source, the token-length distribution). Only the index files are read, no shard.
The token-length histogram is a PNG drawn with matplotlib (the ``train`` extra).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import yaml

from moe_cpt.errors import ConfigError
from moe_cpt.fs import absolute_url, join, open_fs, unstrip_protocol
from moe_cpt.store.documents import DocumentIndex
from moe_cpt.store.reader import DatasetVersion

CARD_NAME = "README.md"
HISTOGRAM_NAME = "token_lengths.png"
MAX_ROWS = 30  # rows of the inputs / sources tables; the rest are summed in one line
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LengthStats:
    """Summary of document lengths in tokens (EOS included)."""

    n: int
    min: int
    max: int
    mean: float
    percentiles: dict[int, int]

    @classmethod
    def of(cls, lengths: np.ndarray) -> LengthStats:
        if not len(lengths):
            return cls(0, 0, 0, 0.0, {p: 0 for p in PERCENTILES})
        pct = np.percentile(lengths, PERCENTILES, method="lower")
        return cls(len(lengths), int(lengths.min()), int(lengths.max()), float(lengths.mean()),
                   {p: int(v) for p, v in zip(PERCENTILES, pct, strict=True)})


def histogram_bins(lengths: np.ndarray, n_bins: int = 40) -> tuple[np.ndarray, bool]:
    """Bin edges, and whether they are logarithmic (when the longest document is more than 30
    times the shortest)."""
    lo, hi = max(1, int(lengths.min())), max(2, int(lengths.max()) + 1)
    if hi / lo > 30:
        return np.geomspace(lo, hi, n_bins + 1), True
    return np.linspace(lo, hi, n_bins + 1), False


def histogram_png(lengths: np.ndarray, title: str) -> bytes:
    """The token-length histogram as PNG bytes (matplotlib's Agg canvas; no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("the dataset card's histogram needs matplotlib: pip install 'moe-cpt[train]' "
                          "(or pip install matplotlib)") from exc
    fig = Figure(figsize=(7, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(lengths):
        bins, log = histogram_bins(lengths)
        ax.hist(lengths, bins=bins, color="#4477aa", edgecolor="white", linewidth=0.4)
        if log:
            ax.set_xscale("log")
    ax.set_xlabel("document length (tokens, EOS included)")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out


def _capped(rows: list[list[str]], what: str) -> list[list[str]]:
    if len(rows) <= MAX_ROWS:
        return rows
    return rows[:MAX_ROWS] + [[f"... {len(rows) - MAX_ROWS} more {what}"] + [""] * (len(rows[0]) - 1)]


def per_source(index: DocumentIndex) -> list[tuple[str, int, int]]:
    """``(source, documents, tokens)`` per input source in the index, most tokens first."""
    if not len(index):
        return []
    t = pa.table({"source": index.column("source").tolist(), "n": index.n_tokens})
    g = t.group_by("source").aggregate([("n", "count"), ("n", "sum")]).to_pylist()
    return sorted(((r["source"], r["n_count"], r["n_sum"]) for r in g), key=lambda r: (-r[2], r[0]))


def per_input(config: dict, sources: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``(configured input URL, documents, tokens)``: each source file counted under the longest
    configured input URL it starts with (``(other)`` if none)."""
    urls = sorted((str(i.get("url", "")) for i in config.get("inputs") or [] if isinstance(i, dict)),
                  key=len, reverse=True)
    totals: dict[str, list[int]] = {u: [0, 0] for u in sorted(urls)}
    for source, docs, tokens in sources:
        key = next((u for u in urls if u and source.startswith(u.removeprefix("file://"))), "(other)")
        totals.setdefault(key, [0, 0])
        totals[key][0] += docs
        totals[key][1] += tokens
    return [(u, d, t) for u, (d, t) in totals.items()]


def render_card(ds: DatasetVersion, index: DocumentIndex, tags: list[str], histogram: str | None) -> str:
    """The card's Markdown; ``histogram`` is the PNG's path relative to the card (None: no picture)."""
    m = ds.manifest
    tok = m.tokenizer
    license_ = m.config.get("license") if isinstance(m.config, dict) else None
    lengths = index.n_tokens
    stats = LengthStats.of(lengths)
    lines = [f"# Dataset card: {ds.name}@{ds.version}", ""]
    lines += _table(["", ""], [
        ["dataset", ds.name], ["version id", ds.version], ["tags", ", ".join(tags) or "none"],
        ["license", license_ or "not recorded (set `license:` in the dataset config)"],
        ["built", str(m.build.get("created_at", "?"))], ["published", str(m.build.get("published_at", "?"))],
        ["code", " ".join(f"{k}={v}" for k, v in sorted((m.build.get("code") or {}).items())) or "?"],
        ["format", m.format], ["store", absolute_url(ds.store.url)],
    ])
    in_bytes = sum(int(i.get("size", 0) or 0) for i in m.inputs)
    lines += ["", "## Sizes", ""]
    lines += _table(["documents", "tokens", "shards", "blocks", "stored bytes", "input files", "input bytes"],
                    [[f"{m.n_docs:,}", f"{m.n_tokens:,}", str(len(m.shards)), str(m.n_blocks), f"{m.nbytes:,}",
                      str(len(m.inputs)), f"{in_bytes:,}"]])
    lines += ["", "## Sources", "", "Input files the build read (from the manifest):", ""]
    lines += _table(["input", "bytes"], _capped([[str(i.get("url", "?")), f"{int(i.get('size', 0) or 0):,}"]
                                                 for i in m.inputs], "inputs"))
    sources = per_source(index)
    lines += ["", "Documents kept per configured input (from the per-document index):", ""]
    lines += _table(["input", "documents", "tokens"],
                    [[u, f"{d:,}", f"{t:,}"] for u, d, t in per_input(m.config, sources)])
    lines += ["", "Documents kept per source file, most tokens first:", ""]
    lines += _table(["source", "documents", "tokens"],
                    _capped([[s or "?", f"{d:,}", f"{t:,}"] for s, d, t in sources], "sources"))
    lines += ["", "## Cleaning and deduplication", ""]
    rows = []
    for st in m.stats.get("stages", []):
        removed = st["docs_in"] - st["docs_out"]
        reasons = ", ".join(f"{k}: {v}" for k, v in st.get("reasons", {}).items())
        rows.append([st["stage"], f"{st['docs_in']:,}", f"{st['docs_out']:,}",
                     f"{removed:,}" + (f" ({reasons})" if reasons else "")])
    lines += _table(["stage", "docs in", "docs out", "removed"], rows)
    bad = m.stats.get("bad_records_skipped", 0)
    if bad:
        lines += ["", f"Bad input records skipped: {bad:,}."]
    dedup = m.config.get("dedup") if isinstance(m.config, dict) else None
    if dedup:
        lines += ["", f"Dedup settings: `{yaml.safe_dump(dedup, default_flow_style=True, width=10**6).strip()}`"]
    lines += ["", "## Document lengths", ""]
    pct = ", ".join(f"p{p} {v:,}" for p, v in stats.percentiles.items())
    lines += [f"Tokens per document (EOS included): min {stats.min:,}, mean {stats.mean:,.1f}, {pct}, "
              f"max {stats.max:,} over {stats.n:,} documents."]
    if histogram:
        lines += ["", f"![token-length histogram]({histogram})"]
    lines += ["", "## Tokenizer", ""]
    lines += _table(["", ""], [["source", tok.name], ["sha256", tok.sha256], ["vocab size", f"{tok.vocab_size:,}"],
                               ["EOS", f"`{tok.eos_token}` (id {tok.eos_id}, appended to every document)"],
                               ["token dtype", tok.dtype], ["stored at", f"{absolute_url(ds.store.url)}/{tok.store_path}"]])
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(m.config, sort_keys=True).rstrip(), "```"]
    spec, store = f"{ds.name}@{ds.version}", absolute_url(ds.store.url)
    lines += ["", "## Use it", "", "```sh",
              f"cpt corpus sample {spec} --store {store} -n 3      # documents as text, with provenance",
              f"cpt corpus export {spec} --store {store} --format hf OUT",
              f"cpt corpus verify {spec} --store {store}", "```", ""]
    return "\n".join(lines)


def write_card(ds: DatasetVersion, out_url: str, tags: list[str] | None = None,
               index: DocumentIndex | None = None) -> list[str]:
    """Write ``OUT/README.md`` and ``OUT/token_lengths.png``; returns their URLs."""
    index = index or DocumentIndex(ds)
    png = histogram_png(index.n_tokens, f"{ds.name}@{ds.version[:12]}: {len(index):,} documents")
    fs, out = open_fs(out_url)
    fs.makedirs(out, exist_ok=True)
    with fs.open(join(out, HISTOGRAM_NAME), "wb") as f:
        f.write(png)
    with fs.open(join(out, CARD_NAME), "w") as f:
        f.write(render_card(ds, index, tags or [], HISTOGRAM_NAME))
    return [unstrip_protocol(fs, join(out, CARD_NAME)), unstrip_protocol(fs, join(out, HISTOGRAM_NAME))]
