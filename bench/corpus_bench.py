"""`cpt bench corpus`: throughput per core, dedup cost, worker scaling, peak RSS and dedup quality.

Input: JSONL generated from the embedded demo's text (`prose` + `code`): documents of random
runs of demo lines, plus planted duplicates (3% exact copies, 5% near copies at word-edit rates
1-5%), in 8 files so tasks split evenly. Every measurement runs in a fresh subprocess with
``RAYON_NUM_THREADS=1`` (one core per worker) and reports its peak RSS (the process, or the
largest of its worker processes). Rows:

1. raw ``tokenizers`` ``encode_batch_fast`` (texts already in memory): the physical limit;
2. ours without dedup, 1 worker; 3. ours with exact + MinHash dedup, 1 worker;
4. datatrove's ``DocumentTokenizer``, 1 worker, and
5. MinHash stages alone (signatures, buckets, clusters), datatrove's vs ours, both on a smaller
   input of the same kind (``--peer-tokens``, to keep the bench within minutes);
6. ours with dedup on 2 workers vs 1 (same tasks, wall clock, runs interleaved, best of
   ``--repeat``) beside the machine's own scaling, raw ``tokenizers`` in 1 vs 2 forked processes
   (on a VM whose second core is shared, two fully independent processes get less than 2x); a
   4x smaller input (RSS vs corpus size) and one huge document at two sizes (peak RSS must not
   grow with it);
7. dedup precision/recall on planted near-duplicates (bench/planted_dups.py), datatrove vs ours.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

from moe_cpt.bench.minhash_runs import run_minhash
from moe_cpt.bench.planted_dups import PlantedSpec, edit, make_planted, score
from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, config_from_dict
from moe_cpt.corpus.demo import ensure_tokenizer, write_raw_inputs

N_FILES = 8
DEDUP = {"exact": True, "minhash": {"enabled": True}}
NO_DEDUP = {"exact": False, "minhash": {"enabled": False}}


# ---- input ---------------------------------------------------------------------------------------
def demo_texts(raw: Path) -> list[str]:
    write_raw_inputs(raw)
    texts = [json.loads(line)["text"] for f in sorted((raw / "prose").glob("*.jsonl")) for line in f.open()]
    texts += [p.read_text(encoding="utf-8") for p in sorted((raw / "code").rglob("*.py"))]
    return [t for t in texts if t.strip()]


def generate_input(texts: list[str], chars: int, out: Path, seed: int = 0) -> dict[str, int]:
    """Write about ``chars`` characters of documents into ``out/part-K.jsonl``; returns counts.

    A document is 10-120 demo lines drawn without replacement from a shuffled pass over all demo
    lines (a new shuffle per pass), so two generated documents share a line only by chance and
    are not near-duplicates of each other; then 3% exact and 5% near copies (word-edit rate
    1-5%) of recent documents are planted."""
    rng = random.Random(seed)
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
    pool = [w for t in texts[:200] for w in t.split()]
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"part-{k}.jsonl", "wb") for k in range(N_FILES)]
    counts = {"docs": 0, "exact_copies": 0, "near_copies": 0}
    recent: list[str] = []
    order: list[int] = []
    written = 0
    while written < chars:
        r = rng.random()
        if r < 0.03 and recent:
            text = rng.choice(recent)
            counts["exact_copies"] += 1
        elif r < 0.08 and recent:
            text = " ".join(edit(rng.choice(recent).split(" "), rng.choice((0.01, 0.02, 0.05)), pool, rng))
            counts["near_copies"] += 1
        else:
            k = rng.randint(10, 120)
            if len(order) < k:
                order = list(range(len(lines)))
                rng.shuffle(order)
            text = "\n".join(lines[i] for i in order[-k:])
            del order[-k:]
            recent = (recent + [text])[-1000:]
        files[counts["docs"] % N_FILES].write(orjson.dumps({"id": str(counts["docs"]), "text": text}) + b"\n")
        counts["docs"] += 1
        written += len(text)
    for f in files:
        f.close()
    return counts


HUGE_DOC_CHARS = (16 << 20, 64 << 20)  # two sizes: peak RSS must not grow with the document (blocks)


def huge_label(chars: int) -> str:
    return f"ours+dedup huge doc {chars >> 20}M"


def huge_doc_input(texts: list[str], chars: int, out: Path) -> None:
    """One document of about ``chars`` characters (the demo text repeated) in one file."""
    out.mkdir(parents=True, exist_ok=True)
    body = "\n".join(texts)
    text = (body * (chars // len(body) + 1))[:chars]
    (out / "huge.jsonl").write_bytes(orjson.dumps({"id": "huge", "text": text}) + b"\n")


# ---- measurements (each in its own process) -----------------------------------------------------
class _Timer:
    """Wall and CPU seconds (this process and its waited-for children) of a block."""

    def __enter__(self) -> _Timer:
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def result(self, **kw: object) -> dict:
        return {"seconds": self.wall, "cpu_seconds": self.cpu, **kw}


def _input_texts(inp: Path) -> list[str]:
    return [json.loads(line)["text"] for f in sorted(inp.glob("*.jsonl")) for line in f.open()]


def _encode_count(tok: Tokenizer, texts: list[str]) -> int:
    """Tokens (+1 EOS per text) of ``texts``, encoded 256 at a time as the pipeline does."""
    return sum(len(e.ids) + 1 for i in range(0, len(texts), 256)
               for e in tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=False))


def raw_in_processes(texts: list[str], tok_path: str, procs: int) -> dict:
    """The machine's own scaling, for reference: raw ``encode_batch_fast`` of the texts split over
    ``procs`` forked processes (no I/O, no coordination), timed from the moment all have loaded
    the tokenizer until the last one is done. On a machine whose cores are not all free (a shared
    VM) two processes get less than 2x; the bench prints it beside the pipeline's scaling."""
    ctx = mp.get_context("fork")  # the texts are inherited, not pickled; no tokenizer ran before
    ready, counts = ctx.Barrier(procs + 1), ctx.Queue()

    def encode_part(k: int) -> None:
        tok = Tokenizer.from_file(tok_path)
        ready.wait()
        counts.put(_encode_count(tok, texts[k::procs]))

    workers = [ctx.Process(target=encode_part, args=(k,)) for k in range(procs)]
    for w in workers:
        w.start()
    ready.wait()
    t0 = time.perf_counter()
    n = sum(counts.get() for _ in workers)
    seconds = time.perf_counter() - t0
    for w in workers:
        w.join()
    return {"seconds": seconds, "tokens": n}


def measure(spec: dict) -> dict:
    kind, inp, tok_path, work = spec["kind"], Path(spec["input"]), spec["tokenizer"], Path(spec["work"])
    if kind == "raw":
        texts = _input_texts(inp)
        tok = Tokenizer.from_file(tok_path)
        with _Timer() as t:
            n = _encode_count(tok, texts)
        return t.result(tokens=n)
    if kind == "raw-procs":
        return raw_in_processes(_input_texts(inp), tok_path, spec["procs"])
    if kind == "ours":
        cfg = config_from_dict({"name": "bench", "inputs": [str(inp)], "tokenizer": tok_path, "tasks": spec["tasks"],
                                "dedup": spec["dedup"], "packing": {"block_tokens": 65536}})
        with _Timer() as t:
            result = build_dataset(cfg, str(work / "store"), ExecutorConfig(workers=spec["workers"]))
        return t.result(tokens=result.manifest.n_tokens, stages=result.stage_seconds,
                        stats=result.manifest.stats["stages"])
    if kind == "dt-tokenizer":
        out = work / "dt"
        ex = LocalPipelineExecutor(
            pipeline=[JsonlReader(str(inp)),
                      DocumentTokenizer(str(out), tokenizer_name_or_path=tok_path, eos_token="<|endoftext|>",
                                        shuffle_documents=False)],
            tasks=1, workers=1, logging_dir=str(work / "dt-logs"))
        with _Timer() as t:
            ex.run()
        return t.result(tokens=sum(os.path.getsize(p) for p in out.rglob("*.ds")) // 2)
    if kind == "quality":
        return {"quality": dedup_quality(json.loads(inp.read_text()), work)}
    if kind in ("dt-minhash", "our-minhash"):
        with _Timer() as t:
            run = run_minhash("datatrove" if kind == "dt-minhash" else "ours", inp, work)
        return t.result(removed=int(sum(len(v) for v in run.removed.values())))
    raise ValueError(kind)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_measure(spec: dict) -> dict:
    """Run one measurement in a fresh process; adds the peak RSS of the largest process of its
    tree (VmHWM, sampled every 0.1 s: the measuring process or one of its datatrove workers)."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "moe_cpt.bench.corpus_bench", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict[int, float] = {}
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            peak[pid] = max(peak.get(pid, 0.0), _hwm_mb(pid))
        time.sleep(0.1)
    out = proc.stdout.read()
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench step {spec['kind']} failed:\n{''.join(err)[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "rss_mb": max(peak.values(), default=0.0)}


# ---- the bench -----------------------------------------------------------------------------------
def bench_corpus(raw_dir: str = "data/raw", tokens: int = 50_000_000, peer_tokens: int = 10_000_000,
                 quality: bool = True, repeat: int = 1, console: Console | None = None) -> dict:
    """Run the bench; each measurement is the best (least CPU time) of ``repeat`` runs."""
    console = console or Console(stderr=True)
    raw = Path(raw_dir).resolve()
    texts = demo_texts(raw)
    tok_path = str(ensure_tokenizer(raw, console))
    sample = "\n".join(texts[:300])
    chars_per_token = len(sample) / len(Tokenizer.from_file(tok_path).encode(sample).ids)
    work = Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    try:
        return _bench(texts, tok_path, chars_per_token, work, tokens, peer_tokens, quality, repeat, console)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(texts: list[str], tok_path: str, cpt: float, work: Path, tokens: int, peer_tokens: int,
           quality: bool, repeat: int, console: Console) -> dict:
    full, small, peer, huge = work / "in", work / "in-small", work / "in-peer", work / "in-huge"
    t0 = time.perf_counter()
    planted = generate_input(texts, int(tokens * cpt), full)
    generate_input(texts, int(tokens * cpt / 4), small, seed=1)
    generate_input(texts, int(peer_tokens * cpt), peer, seed=2)
    for chars in HUGE_DOC_CHARS:
        huge_doc_input(texts, chars, huge / str(chars))
    console.print(f"bench corpus: generated ~{tokens / 1e6:.0f}M tokens ({planted['docs']:,} docs, "
                  f"{planted['exact_copies']:,} exact + {planted['near_copies']:,} near copies planted) "
                  f"in {time.perf_counter() - t0:.0f}s")

    def run_once(label: str, i: int, spec: dict, by: str) -> dict:
        """One run of ``spec``; ``results[label]`` keeps the best (least ``by``) so far."""
        run_dir = work / f"run-{len(results)}-{label.replace(' ', '_')}-{i}"
        console.print(f"  running: {label} ({i + 1}/{repeat}) ...")
        r = run_measure({"tokenizer": tok_path, "work": str(run_dir), **spec})
        shutil.rmtree(run_dir, ignore_errors=True)
        if label not in results or r.get(by, 0) < results[label].get(by, 0):
            results[label] = r
        return results[label]

    def step(label: str, **spec) -> dict:
        for i in range(repeat if spec["kind"] != "quality" else 1):
            run_once(label, i, spec, "cpu_seconds")
        return results[label]

    results: dict[str, dict] = {}
    step("raw", kind="raw", input=str(full))
    step("ours", kind="ours", input=str(full), tasks=2, workers=1, dedup=NO_DEDUP)
    # worker scaling, interleaved so that a change in the machine's load hits both sides alike;
    # wall-clock, best of `repeat`; with the machine's own scaling (raw tokenizers in 1 vs 2 processes)
    scaling = {"ours+dedup": dict(kind="ours", input=str(full), tasks=2, workers=1, dedup=DEDUP),
               "ours+dedup 2 workers": dict(kind="ours", input=str(full), tasks=2, workers=2, dedup=DEDUP),
               "raw 1 process": dict(kind="raw-procs", input=str(full), procs=1),
               "raw 2 processes": dict(kind="raw-procs", input=str(full), procs=2)}
    for i in range(repeat):
        for label, spec in scaling.items():
            run_once(label, i, spec, "seconds")
    peer_raw = step("raw (peer input)", kind="raw", input=str(peer))
    step("dt-tokenizer", kind="dt-tokenizer", input=str(peer))
    step("dt-minhash", kind="dt-minhash", input=str(peer))
    step("our-minhash", kind="our-minhash", input=str(peer))
    step("ours+dedup small", kind="ours", input=str(small), tasks=2, workers=1, dedup=DEDUP)
    for chars in HUGE_DOC_CHARS:
        step(huge_label(chars), kind="ours", input=str(huge / str(chars)), tasks=1, workers=1, dedup=DEDUP)
    for label in ("dt-minhash", "our-minhash"):
        results[label]["tokens"] = peer_raw["tokens"]
    for label in ("ours", "ours+dedup", "ours+dedup 2 workers"):
        results[label]["input_tokens"] = results["raw"]["tokens"]
    out = {"results": results, "planted": planted, "load": os.getloadavg()}
    if quality:
        texts_file = work / "quality-texts.json"
        texts_file.write_text(json.dumps(texts))
        out["quality"] = step("quality", kind="quality", input=str(texts_file))["quality"]
    return out


QUALITY_SPEC = PlantedSpec(originals=1500, words=(100, 800), edit_rates=(0.0, 0.01, 0.02, 0.03, 0.05, 0.1),
                           clusters_per_rate=150, copies=1, seed=0)


def dedup_quality(texts: list[str], work: Path, spec: PlantedSpec = QUALITY_SPEC) -> dict:
    planted = make_planted(texts, spec)
    inp = work / "in"
    inp.mkdir(parents=True)
    (inp / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted.records))
    out = {}
    for method in ("datatrove", "ours"):
        run = run_minhash(method, inp, work / method)
        out[method] = score(planted, {planted.records[i]["id"] for i in run.removed.get(0, [])})
    return out


# ---- printing ------------------------------------------------------------------------------------
def print_report(out: dict, console: Console | None = None) -> None:
    """Per-core rates are tokens / CPU seconds of the (single-worker) run, so that other load on
    the machine does not count against them; wall seconds are shown beside them. Worker scaling
    is wall-clock (only meaningful on an idle machine)."""
    console = console or Console()
    res = out["results"]

    def tokens_in(label: str) -> int:  # input tokens: the work done, whatever dedup removed
        return res[label].get("input_tokens", res[label]["tokens"])

    def rate(label: str) -> float:
        return tokens_in(label) / res[label]["cpu_seconds"]

    def wall_rate(label: str) -> float:
        return tokens_in(label) / res[label]["seconds"]

    console.print(f"load average at the end: {' '.join(f'{x:.1f}' for x in out['load'])} "
                  f"({os.cpu_count()} CPUs); planted: {out['planted']}")
    t = Table(title="corpus pipeline, 1 worker: input tokens per CPU-second")
    for col in ("pipeline", "tokens in", "tokens out", "wall s", "CPU s", "tokens/s/core", "vs raw", "peak RSS MB"):
        t.add_column(col, justify="left" if col == "pipeline" else "right")
    rows = (("raw", "raw tokenizers encode_batch_fast (texts in memory)"),
            ("ours", "moe-cpt: read+clean+tokenize+shard, no dedup"),
            ("ours+dedup", "moe-cpt + exact & MinHash dedup"),
            ("raw (peer input)", "raw tokenizers, on the --peer-tokens input"),
            ("dt-tokenizer", "datatrove DocumentTokenizer, on the --peer-tokens input"))
    for label, name in rows:
        r = res[label]
        raw_rate = rate("raw (peer input)") if label == "dt-tokenizer" else rate("raw")
        t.add_row(name, f"{tokens_in(label):,}", f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}",
                  f"{rate(label):,.0f}", f"{rate(label) / raw_rate:.2f}x", f"{r['rss_mb']:.0f}")
    console.print(t)

    st = res["ours+dedup"]["stages"]
    dedup_s = sum(v for k, v in st.items() if k != "tokenize")
    console.print("stages of moe-cpt + dedup (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
                  + f"; dedup stages {dedup_s / sum(st.values()):.0%} of the stage time")
    m = Table(title="MinHash stages alone (signatures + buckets + clusters), same input, 1 worker")
    for col in ("implementation", "input tokens", "wall s", "CPU s", "tokens/s/core", "docs removed", "peak RSS MB"):
        m.add_column(col, justify="left" if col == "implementation" else "right")
    for label, name in (("dt-minhash", "datatrove MinhashDedup* (Python shingling)"),
                        ("our-minhash", "moe-cpt DedupSignatures + datatrove buckets + DedupCluster")):
        r = res[label]
        m.add_row(name, f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{rate(label):,.0f}",
                  f"{r['removed']:,}", f"{r['rss_mb']:.0f}")
    console.print(m)

    s = Table(title="moe-cpt + dedup: worker scaling (wall clock, 2 tasks, interleaved, best of --repeat) and memory")
    for col in ("run", "tokens in", "wall s", "tokens/s (wall)", "vs 1 worker", "peak RSS MB per worker"):
        s.add_column(col, justify="left" if col == "run" else "right")
    one = wall_rate("ours+dedup")
    reference = res["raw 1 process"]["seconds"] / res["raw 2 processes"]["seconds"]
    for label, name in (("raw 1 process", "machine: raw tokenizers, 1 process"),
                        ("raw 2 processes", "machine: raw tokenizers, 2 processes")):
        r = res[label]
        s.add_row(name, f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{r['tokens'] / r['seconds']:,.0f}",
                  f"{res['raw 1 process']['seconds'] / r['seconds']:.2f}x", "-")
    for label, name in (("ours+dedup", "1 worker"), ("ours+dedup 2 workers", "2 workers"),
                        ("ours+dedup small", "1 worker, 1/4 of the input"),
                        *((huge_label(c), f"1 worker, one {c >> 20}M-character document") for c in HUGE_DOC_CHARS)):
        r = res[label]
        scaling = label in ("ours+dedup", "ours+dedup 2 workers")
        s.add_row(name, f"{tokens_in(label):,}" if scaling else f"{r['tokens']:,} out", f"{r['seconds']:.1f}",
                  f"{wall_rate(label):,.0f}" if scaling else "-", f"{wall_rate(label) / one:.2f}x" if scaling else "-",
                  f"{r['rss_mb']:.0f}")
    console.print(s)

    if "quality" in out:
        q = Table(title="dedup quality on planted near-duplicates (same n_grams/buckets/hashes/seed)")
        for col in ("subset", "should remove", "datatrove P", "datatrove R", "ours P", "ours R"):
            q.add_column(col, justify="left" if col == "subset" else "right")
        dt, ours = out["quality"]["datatrove"], out["quality"]["ours"]
        for k in dt:
            q.add_row(k, str(dt[k]["should"]), f"{dt[k]['precision']:.3f}", f"{dt[k]['recall']:.3f}",
                      f"{ours[k]['precision']:.3f}", f"{ours[k]['recall']:.3f}")
        console.print(q)

    console.print(f"targets: moe-cpt + dedup / raw = {rate('ours+dedup') / rate('raw'):.2f} per core (>= 0.80); "
                  f"our MinHash stages / datatrove's = {rate('our-minhash') / rate('dt-minhash'):.1f}x (> 1); "
                  f"2 workers / 1 worker = {wall_rate('ours+dedup 2 workers') / one:.2f}x wall (>= 1.8); for reference, "
                  f"two independent raw-tokenizer processes got {reference:.2f}x on this machine in the same run")


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    print(json.dumps(measure(spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
