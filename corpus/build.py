"""Build a dataset version: plan inputs, run the datatrove stages, publish atomically.

Stages (each a datatrove executor run; finished tasks are skipped when a build is rerun):

1. ``dedup-signatures``   exact hashes + MinHash signatures in one pass (if either is enabled)
2. ``exact-find`` / ``minhash-pairs`` / ``minhash-clusters``   find the duplicates
3. ``tokenize``   read -> clean -> dedup filters -> tokenize -> shards in the work folder
4. publish     move shards into ``<store>/<dataset>/<version>/``, manifest last

A build is identified by its *build key* (config + tokenizer hash + input sizes/etags/mtimes):
building the same key again is a no-op, and the work folder of an interrupted build is reused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datatrove.pipeline.base import PipelineStep

from moe_cpt.codeversion import code_version
from moe_cpt.corpus.cleaning import MinCharsFilter, UnicodeNormalizer
from moe_cpt.corpus.config import DEFAULT_GLOBS, DatasetConfig, ExecutorConfig
from moe_cpt.corpus.dedup import DedupPlan
from moe_cpt.corpus.lock import acquire_build_lock
from moe_cpt.corpus.publish import publish_version
from moe_cpt.corpus.readers import StrictJsonlReader, StrictParquetReader, TextFileReader
from moe_cpt.corpus.tokenize_step import TokenizeToShards
from moe_cpt.errors import ConfigError, CptError, InputDataError
from moe_cpt.fs import dumps_canonical, join, open_fs, unstrip_protocol
from moe_cpt.hashing import sha256_hex
from moe_cpt.store.manifest import Manifest, TokenizerInfo
from moe_cpt.store.object_store import Store
from moe_cpt.store.shard_format import ShardRecord
from moe_cpt.store.tokenizer import read_tokenizer_bytes, tokenizer_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    etag: str | None
    mtime: float | None


@dataclass
class PlannedInput:
    folder: str  # URL given to the datatrove reader
    glob: str
    format: str
    files: list[InputFile]


@dataclass
class Stage:
    name: str
    tasks: int
    pipeline: list[PipelineStep]
    reads_input: bool  # reports input-byte progress


@dataclass
class BuildResult:
    name: str
    version: str
    manifest: Manifest
    skipped: bool  # True when the same build had already been published
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


# ---- planning ------------------------------------------------------------------------------
def plan_inputs(cfg: DatasetConfig) -> list[PlannedInput]:
    planned = []
    for inp in cfg.inputs:
        fs, path = open_fs(inp.url)
        try:
            is_file = fs.isfile(path)
            if is_file:
                folder, glob = path.rsplit("/", 1) if "/" in path else (".", path)
            else:
                folder, glob = path, inp.glob or DEFAULT_GLOBS[inp.format]
            matches = sorted(p for p in fs.glob(join(folder, glob)) if fs.isfile(p))
        except (OSError, ValueError) as exc:  # e.g. unreachable endpoint, no such bucket
            raise ConfigError(f"cannot list input {inp.url}: {exc}") from exc
        if not matches:
            raise ConfigError(f"input {inp.url} (glob {glob!r}) matched no files")
        files = []
        for p in matches:
            info = fs.info(p)
            files.append(
                InputFile(
                    url=unstrip_protocol(fs, p),
                    size=int(info.get("size") or 0),
                    etag=(info.get("ETag") or info.get("etag") or None),
                    mtime=_mtime(info),
                )
            )
        planned.append(PlannedInput(unstrip_protocol(fs, folder), glob, inp.format, files))
    return planned


def _mtime(info: dict[str, Any]) -> float | None:
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def compute_build_key(cfg: DatasetConfig, tok: TokenizerInfo, inputs: list[PlannedInput]) -> str:
    material = {
        "config": cfg.identity(),
        "tokenizer": tok.sha256,
        "inputs": [[f.__dict__ for f in p.files] for p in inputs],
    }
    return sha256_hex(dumps_canonical(material))[:24]


def input_records(inputs: list[PlannedInput]) -> list[dict[str, Any]]:
    return [dict(f.__dict__) for p in inputs for f in p.files]


# ---- stages --------------------------------------------------------------------------------
def front_steps(cfg: DatasetConfig, inputs: list[PlannedInput], progress: str | None = None) -> list[PipelineStep]:
    """Readers + cleaning: the deterministic start of every stage that reads documents."""
    steps: list[PipelineStep] = []
    for p in inputs:
        if p.format == "jsonl":
            steps.append(StrictJsonlReader(p.folder, p.glob, cfg.text_field, cfg.id_field, cfg.on_bad_record, progress))
        elif p.format == "parquet":
            steps.append(StrictParquetReader(p.folder, p.glob, cfg.text_field, cfg.id_field, cfg.on_bad_record, progress))
        else:
            steps.append(TextFileReader(p.folder, p.glob, cfg.on_bad_record, progress))
    if cfg.clean.unicode_normalization:
        steps.append(UnicodeNormalizer(cfg.clean.unicode_normalization))
    steps.append(MinCharsFilter(cfg.clean.min_chars))
    return steps


class BuildPlan:
    """The stages of one build, with all their paths under the build's work folder."""

    def __init__(self, cfg: DatasetConfig, inputs: list[PlannedInput], work_url: str,
                 tokenizer_json: bytes, tok: TokenizerInfo, workers: int):
        self.cfg = cfg
        self.inputs = inputs
        self.work = work_url
        self.tokenizer_json = tokenizer_json
        self.tok = tok
        self.dedup = DedupPlan(cfg.dedup, work_url)
        self.tasks = cfg.tasks
        self.workers = workers
        self.local_progress = self.work if "://" not in self.work else None

    def progress_dir(self, stage: str) -> str | None:
        if self.local_progress is None:
            return None
        path = join(self.local_progress, "progress", stage)
        os.makedirs(path, exist_ok=True)
        return path

    def front(self, stage: str) -> list[PipelineStep]:
        return front_steps(self.cfg, self.inputs, self.progress_dir(stage))

    def stages(self) -> list[Stage]:
        d, t = self.dedup, self.tasks
        out: list[Stage] = []
        if d.exact or d.minhash:  # one pass computes both kinds of signatures (corpus/dedup.py)
            out.append(Stage("dedup-signatures", t, self.front("dedup-signatures") + [d.signatures()], True))
        if d.exact:
            out.append(Stage("exact-find", 1, [d.exact_find()], False))
        if d.minhash:
            out.append(Stage("minhash-pairs", self.cfg.dedup.minhash.num_buckets, [d.minhash_buckets()], False))
            out.append(Stage("minhash-clusters", 1, [d.cluster()], False))
        threads = max(1, (os.cpu_count() or 1) // max(1, min(self.workers, t)))
        tokenize = TokenizeToShards(join(self.work, "staging"), self.tokenizer_json, self.tok, self.cfg.packing, threads)
        out.append(Stage("tokenize", t, self.front("tokenize") + d.exact_filter() + d.minhash_filter() + [tokenize], True))
        return out

    def logging_dir(self, stage: str) -> str:
        return join(self.work, "logs", stage)


# What a local worker imports to unpickle and run any stage's pipeline (see start_local_workers)
WORKER_MODULES = ("moe_cpt.corpus.build", "datatrove.executor.local", "tokenizers", "pyarrow.parquet", "xxhash",
                  "regex", "orjson", "zstandard")


def start_local_workers() -> None:
    """Have datatrove's local worker pools start warm. Its pools fork their workers from
    multiprocess' forkserver, which imports only ``__main__``, so each worker of each pooled stage
    spent ~0.6-1 s importing the pipeline's modules (numpy, datatrove, tokenizers, ...). Named as the
    forkserver's preload, they are imported once per build process, in the forkserver, which is
    started here, before the driver plans the build, so that its imports overlap the planning.
    (The preload is a setting of the multiprocess library; it applies only if the forkserver has not
    started yet in this process: later pools reuse the running one as it is.)"""
    import multiprocess
    from multiprocess import forkserver

    multiprocess.set_forkserver_preload(list(WORKER_MODULES))
    forkserver.ensure_running()


def make_executor(stage: Stage, plan: BuildPlan, executor: ExecutorConfig, depends: Any = None) -> Any:
    logging_dir = plan.logging_dir(stage.name)
    if executor.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline=stage.pipeline, tasks=stage.tasks,
                                     workers=min(executor.workers, stage.tasks), logging_dir=logging_dir)
    if executor.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        opts = {"time": "04:00:00", "partition": "cpu", "cpus_per_task": 1, "mem_per_cpu_gb": 2, **executor.options}
        return SlurmPipelineExecutor(pipeline=stage.pipeline, tasks=stage.tasks, logging_dir=logging_dir,
                                     job_name=f"cpt-{plan.cfg.name}-{stage.name}", depends=depends, **opts)
    if executor.kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=stage.pipeline, tasks=stage.tasks, logging_dir=logging_dir,
                                   depends=depends, **executor.options)
    raise ConfigError(f"unknown executor kind {executor.kind!r} (local, slurm, ray)")


# ---- collecting results ------------------------------------------------------------------------
def _read_stage_stats(plan: BuildPlan, stage: str) -> list[dict]:
    """Per-step counters of a stage, summed over its tasks (from datatrove's per-task stats)."""
    fs, root = open_fs(join(plan.logging_dir(stage), "stats"))
    if not fs.exists(root):
        return []
    merged: list[dict] = []
    for path in sorted(fs.ls(root, detail=False)):
        with fs.open(path, "r") as f:
            steps = json.load(f)
        for i, step in enumerate(steps):
            if len(merged) <= i:
                merged.append({"name": step["name"], "counts": {}})
            for key, value in step.get("stats", {}).items():
                n = value.get("total", value.get("n", 0)) if isinstance(value, dict) else value
                if isinstance(n, (int, float)):
                    merged[i]["counts"][key] = merged[i]["counts"].get(key, 0) + n
    return merged


STEP_LABELS = (("READER", "read"), ("Min length", "clean: min length"),
               ("exact-dedup", "dedup: exact"), ("MinHash", "dedup: minhash"))


def _label(step_name: str) -> str:
    return next((label for key, label in STEP_LABELS if key in step_name), step_name)


def collect_stats(plan: BuildPlan) -> dict[str, Any]:
    """Docs in/out per cleaning and dedup step, as recorded by the final (tokenize) stage."""
    steps = _read_stage_stats(plan, "tokenize")
    table = []
    bad = 0
    for step in steps:
        c = step["counts"]
        if "bad_records_skipped" in c:
            bad += int(c["bad_records_skipped"])
        if "documents" in c and "tokens" in c:
            continue  # our tokenize step, reported via totals
        if "forwarded" in c or "dropped" in c:
            kept = int(c.get("forwarded", 0))
            dropped = int(c.get("dropped", 0))
            reasons = {k.removeprefix("dropped_"): int(v) for k, v in c.items() if k.startswith("dropped_")}
            table.append({"stage": _label(step["name"]), "docs_in": kept + dropped, "docs_out": kept,
                          "dropped": dropped, "reasons": reasons})
        elif "documents" in c:
            table.append({"stage": _label(step["name"]), "docs_in": int(c["documents"]), "docs_out": int(c["documents"])})
    return {"stages": table, "bad_records_skipped": bad}


def collect_shards(plan: BuildPlan) -> tuple[list[ShardRecord], list[str], list[dict[str, Any]]]:
    fs, root = open_fs(join(plan.work, "staging", "results"))
    shards: list[ShardRecord] = []
    index_files: list[str] = []
    index_meta: list[dict[str, Any]] = []
    for rank in range(plan.tasks):
        path = join(root, f"{rank:05d}.json")
        if not fs.exists(path):
            raise CptError(f"tokenize task {rank} left no result at {path}; rerun the build to resume")
        with fs.open(path, "r") as f:
            result = json.load(f)
        shards.extend(ShardRecord.from_json(s) for s in result["shards"])
        index_files.append(result["index"])
        if not result.get("index_file"):
            raise CptError(f"tokenize task {rank} left a result without index checksum at {path} "
                           "(written by older code); delete the work folder and rebuild")
        index_meta.append(result["index_file"])
    return shards, index_files, index_meta


# ---- driver -------------------------------------------------------------------------------
StageRunner = Callable[[Stage, "BuildPlan", Callable[[], None]], None]
"""Runs one stage's ``run()`` callable, e.g. while showing a progress bar."""


def build_dataset(
    cfg: DatasetConfig,
    store_url: str,
    executor: ExecutorConfig = ExecutorConfig(),
    runner: StageRunner | None = None,
    keep_work: bool = False,
    create_bucket: bool = False,
) -> BuildResult:
    """Build and publish ``cfg`` into the store; a no-op if this exact build was published.

    The store's bucket must exist unless ``create_bucket``. A second build of the same key while
    one runs raises :class:`~moe_cpt.errors.BusyError` naming it (see :mod:`moe_cpt.corpus.lock`)."""
    t0 = time.monotonic()
    if executor.kind == "local" and executor.workers > 1:
        start_local_workers()
    store = Store(store_url)
    tok_bytes = read_tokenizer_bytes(cfg.tokenizer)
    tok = tokenizer_info(tok_bytes, cfg.tokenizer, cfg.eos_token)
    inputs = plan_inputs(cfg)
    key = compute_build_key(cfg, tok, inputs)
    store.check_bucket(create=create_bucket)
    done = _published(store, cfg.name, key)
    if done:
        return done
    with acquire_build_lock(store.fs, store.work_path(cfg.name, key), f"a build of {cfg.name} (build key {key})"):
        done = _published(store, cfg.name, key)  # the holder before us may have finished it
        if done:
            return done
        return _build_locked(cfg, store, executor, runner, keep_work, t0, key, tok_bytes, tok, inputs)


def _published(store: Store, name: str, key: str) -> BuildResult | None:
    if not store.refs_log(name).exists():
        return None
    done = store.load_refs(name).builds.get(key)
    if done and store.has_version(name, done):
        return BuildResult(name, done, store.load_manifest(name, done), skipped=True)
    return None


def _build_locked(cfg: DatasetConfig, store: Store, executor: ExecutorConfig, runner: StageRunner | None,
                  keep_work: bool, t0: float, key: str, tok_bytes: bytes, tok: TokenizerInfo,
                  inputs: list[PlannedInput]) -> BuildResult:
    work_url = store.url_of("_work", cfg.name, key)
    plan = BuildPlan(cfg, inputs, work_url, tok_bytes, tok, executor.workers)
    stage_seconds: dict[str, float] = {}
    depends = None
    for stage in plan.stages():
        ex = make_executor(stage, plan, executor, depends)
        if executor.kind != "local":
            depends = ex
            continue
        s0 = time.monotonic()
        run = lambda ex=ex, stage=stage: _run_stage(ex, stage)  # noqa: E731
        if runner is None:
            run()
        else:
            runner(stage, plan, run)
        stage_seconds[stage.name] = time.monotonic() - s0
    if executor.kind != "local":
        depends.run()  # submits the whole chain; publish with `cpt corpus build` again afterwards
        raise CptError(f"submitted {cfg.name} to {executor.kind}; once the jobs finish, rerun the same "
                       "`cpt corpus build` command to publish (finished tasks are not redone)")

    manifest = finalize_manifest(plan, key)
    if manifest.n_docs == 0 and not cfg.allow_empty:
        read = next((r["docs_out"] for r in manifest.stats.get("stages", []) if r["stage"] == "read"), 0)
        raise InputDataError(
            f"{cfg.name}: the build produced 0 documents ({sum(len(p.files) for p in inputs)} input file(s), "
            f"{read} document(s) read); refusing to publish an empty version (set allow_empty: true to allow it)")
    staging = store.path("_work", cfg.name, key, "staging")
    version = publish_version(store, manifest, staging, key, tok_bytes)
    if not keep_work:
        work = store.work_path(cfg.name, key)
        if store.fs.exists(work):
            store.fs.rm(work, recursive=True)
    return BuildResult(cfg.name, version, manifest, skipped=False,
                       seconds=time.monotonic() - t0, stage_seconds=stage_seconds)


def _run_stage(ex: Any, stage: Stage) -> None:
    try:
        ex.run()
    except CptError:
        raise
    except Exception as exc:  # a datatrove worker failed: name the stage and the logs
        raise CptError(f"stage {stage.name} failed: {type(exc).__name__}: {exc} "
                       f"(task logs: {ex.logging_dir.path}/logs)") from exc
    incomplete = ex.get_incomplete_ranks(skip_completed=True)
    if incomplete:
        raise CptError(f"stage {stage.name}: tasks {incomplete} did not complete "
                       f"(task logs: {ex.logging_dir.path}/logs); rerun to resume")


def finalize_manifest(plan: BuildPlan, key: str) -> Manifest:
    shards, index_files, index_meta = collect_shards(plan)
    return Manifest(
        dataset=plan.cfg.name,
        tokenizer=plan.tok,
        config=plan.cfg.identity(),
        inputs=input_records(plan.inputs),
        shards=shards,
        stats=collect_stats(plan),
        index_files=index_files,
        index_meta=index_meta,
        build={"build_key": key, "code": code_version(),
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
