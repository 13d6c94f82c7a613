"""`cpt corpus ...`: build, list, inspect, verify and tag dataset versions; train tokenizers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from corpus.config import ExecutorConfig, load_config
from corpus.executor_check import check_executor
from corpus.store import Store
from cpt.errors import BusyError, ConfigError, CptError
from cpt.fs import store_errors

DEFAULT_STORE = "data/store"


def default_store() -> str:
    return os.environ.get("CPT_STORE", DEFAULT_STORE)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None,
                   help=f"store URL: local folder, file:// or s3://bucket/prefix (default: $CPT_STORE or {DEFAULT_STORE})")


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="build and inspect versioned token datasets",
                            description="Raw documents -> cleaned, deduplicated, tokenized, versioned shards.")
    csub = corpus.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND", required=True)

    p = csub.add_parser("build", help="build and publish a dataset version from a config file",
                        description="Run the pipeline (clean, exact + MinHash dedup, tokenize, shard) and "
                        "publish an immutable version. Rebuilding the same inputs + config is a no-op; an "
                        "interrupted build resumes without redoing finished tasks.")
    p.add_argument("config", help="dataset config (.yaml/.yml/.toml)")
    _store_arg(p)
    p.add_argument("--workers", type=int, default=2, help="local processes at once (default: 2)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="datatrove executor (default: local)")
    p.add_argument("--executor-options", default=None, metavar="FILE",
                   help="YAML file with options for the slurm/ray executor (partition, time, ...)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (signatures, logs) after publishing")
    p.add_argument("--create-bucket", action="store_true",
                   help="create the store's S3 bucket if it does not exist (otherwise a missing bucket is an error)")
    p.set_defaults(func=_guarded(cmd_build))

    p = csub.add_parser("ls", help="list datasets and their versions in a store")
    _store_arg(p)
    p.set_defaults(func=_guarded(cmd_ls))

    p = csub.add_parser("show", help="stats of one version: docs in/out per stage, tokens, shards, bytes")
    p.add_argument("ref", metavar="NAME@REF", help="e.g. prose@latest, prose@v2, prose@<version id>")
    _store_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_guarded(cmd_show))

    p = csub.add_parser("verify", help="re-check every checksum of a version (names the bad shard/block)")
    p.add_argument("ref", metavar="NAME@REF")
    _store_arg(p)
    p.set_defaults(func=_guarded(cmd_verify))

    p = csub.add_parser("tag", help="point a human tag (e.g. paper-v1) at a version")
    p.add_argument("ref", metavar="NAME@REF")
    p.add_argument("tag")
    _store_arg(p)
    p.set_defaults(func=_guarded(cmd_tag))

    p = csub.add_parser("repair", help="rebuild a dataset's refs from the manifests present (after damage)",
                        description="Detects damaged ref events (or an unreadable refs.json), voids them, and "
                        "registers every version whose manifest is present but not in the refs. Reports what "
                        "cannot be recovered (e.g. tags set in a damaged event).")
    p.add_argument("name", metavar="NAME")
    _store_arg(p)
    p.set_defaults(func=_guarded(cmd_repair))

    p = csub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a dataset's inputs")
    p.add_argument("config", nargs="+", help="dataset config(s) whose (cleaned) inputs to train on")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--out", required=True, help="where to write tokenizer.json (path or URL)")
    p.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents per config")
    p.set_defaults(func=cmd_train_tokenizer)

    p = csub.add_parser("demo", help="build the embedded demo datasets `prose` and `code` (what `make shards` runs)",
                        description="Builds, from text every Python installation ships, a BPE tokenizer and two "
                        "datasets: prose (pydoc topics + stdlib docstrings) and code (stdlib sources).")
    _store_arg(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--raw", default="data/raw", help="where to write the raw demo inputs (default: data/raw)")
    p.set_defaults(func=cmd_demo)


# ---- build ----------------------------------------------------------------------------------
def run_build(cfg_path: str, store_url: str, workers: int, executor: ExecutorConfig, keep_work: bool,
              console: Console | None = None, create_bucket: bool = False) -> Any:
    """Build one config with progress bars; datatrove's logs go to a file named on failure."""
    from corpus.build import build_dataset
    from corpus.progress import StageProgress, stderr_to_file

    cfg = load_config(cfg_path)
    log_path = os.path.join(tempfile.gettempdir(), f"cpt-build-{cfg.name}-{os.getpid()}.log")
    console = console or Console(stderr=True)
    console.print(f"building [bold]{cfg.name}[/] from {len(cfg.inputs)} input(s) into {store_url}")
    from corpus.build import plan_inputs

    total = sum(f.size for p in plan_inputs(cfg) for f in p.files)
    try:
        with stderr_to_file(log_path) as stream:
            runner = StageProgress(Console(file=stream, force_terminal=console.is_terminal), total)
            result = build_dataset(cfg, store_url, executor, runner=runner, keep_work=keep_work,
                                   create_bucket=create_bucket)
    except BusyError:
        os.unlink(log_path)
        raise
    except Exception as exc:
        if hasattr(exc, "args") and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (datatrove log: {log_path})",) + exc.args[1:]
        raise
    os.unlink(log_path)
    if result.skipped:
        console.print(f"{cfg.name}@{result.version}: already built from these inputs and config; nothing to do")
    else:
        console.print(f"published [bold]{cfg.name}@{result.version}[/] in {result.seconds:.1f}s")
    print_stats(console, result.name, result.version, result.manifest)
    return result


def cmd_build(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.executor_options:
        with open(args.executor_options) as f:
            options = yaml.safe_load(f) or {}
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    check_executor(args.executor)
    executor = ExecutorConfig(kind=args.executor, workers=args.workers, options=options)
    run_build(args.config, args.store or default_store(), args.workers, executor, args.keep_work,
              create_bucket=args.create_bucket)
    return 0


# ---- inspection -----------------------------------------------------------------------------
def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def print_stats(console: Console, name: str, version: str, manifest: Any) -> None:
    table = Table(title=f"{name}@{version}")
    table.add_column("stage")
    table.add_column("docs in", justify="right")
    table.add_column("docs out", justify="right")
    table.add_column("removed", justify="right")
    for row in manifest.stats.get("stages", []):
        removed = row["docs_in"] - row["docs_out"]
        reasons = ", ".join(f"{k}: {v}" for k, v in row.get("reasons", {}).items())
        table.add_row(row["stage"], str(row["docs_in"]), str(row["docs_out"]),
                      f"{removed}" + (f" ({reasons})" if reasons else ""))
    bad = manifest.stats.get("bad_records_skipped", 0)
    if bad:
        table.add_row("bad records skipped", "", "", str(bad))
    console.print(table)
    console.print(f"documents {manifest.n_docs:,}  tokens {manifest.n_tokens:,}  shards {len(manifest.shards)}  "
                  f"blocks {manifest.n_blocks}  bytes {manifest.nbytes:,}  tokenizer {manifest.tokenizer.sha256[:12]} "
                  f"({manifest.tokenizer.dtype})")


def cmd_ls(args: argparse.Namespace) -> int:
    store = Store(args.store or default_store())
    console = Console()
    datasets = store.scan_datasets()
    if not datasets:
        console.print(f"no datasets in {store.url}")
        return 0
    table = Table(title=f"datasets in {store.url}")
    for col in ("dataset", "version", "tags", "docs", "tokens", "bytes", "created"):
        table.add_column(col, justify="right" if col in ("docs", "tokens", "bytes") else "left")
    damaged: list[str] = []
    for item in datasets:
        if item.problem:
            damaged.append(f"{item.name}: DAMAGED: {item.problem}")
            table.add_row(item.name, "?", "", "DAMAGED", "", "", "")
            continue
        refs = store.load_refs(item.name)
        for version in item.versions:
            tags = ", ".join(sorted(t for t, v in refs.tags.items() if v == version))
            try:
                m = store.load_manifest(item.name, version)
            except CptError as exc:
                damaged.append(f"{item.name}@{version}: DAMAGED: {exc}")
                table.add_row(item.name, version, tags, "DAMAGED", "", "", "")
                continue
            table.add_row(item.name, version, tags, _human(m.n_docs), _human(m.n_tokens), _human(m.nbytes, "B"),
                          str(m.build.get("created_at", "")))
    console.print(table)
    for line in damaged:
        print(line)
    return 1 if damaged else 0


def cmd_show(args: argparse.Namespace) -> int:
    store = Store(args.store or default_store())
    name, version = store.resolve(args.ref)
    manifest = store.load_manifest(name, version)
    if args.json:
        sys.stdout.write(manifest.to_json_bytes().decode())
        return 0
    console = Console()
    print_stats(console, name, version, manifest)
    console.print(f"inputs: {len(manifest.inputs)} file(s), {sum(i.get('size', 0) or 0 for i in manifest.inputs):,} bytes; "
                  f"built {manifest.build.get('created_at', '?')} by {json.dumps(manifest.build.get('code', {}))}")
    from cpt.runs import RunCatalog

    consumers = RunCatalog(store.url).runs_for_version(name, version)
    console.print(f"runs that read it: {', '.join(consumers) or 'none'}"
                  + (f" (see `cpt runs show RUN --store {store.url}`)" if consumers else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from corpus.reader import open_dataset
    from corpus.verify import verify_version

    ds = open_dataset(args.store or default_store(), args.ref)
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"verifying {ds.spec}", total=ds.manifest.nbytes)
        report = verify_version(ds, on_bytes=lambda n: progress.advance(task, n))
    if report.ok:
        print(f"{ds.spec}: OK ({report.shards_checked} shards, {report.blocks_checked} blocks, "
              f"{report.bytes_checked:,} bytes; {report.files_checked} index/tokenizer files)")
        return 0
    for problem in report.problems:
        print(f"{ds.spec}: CORRUPT: {problem}", file=sys.stderr)
    return 1


def cmd_tag(args: argparse.Namespace) -> int:
    store = Store(args.store or default_store())
    name, version = store.resolve(args.ref)
    store.tag(name, args.tag, version)
    print(f"{name}@{args.tag} -> {version}")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    store = Store(args.store or default_store())
    report = store.repair(args.name)
    print(f"{args.name}: refs damage: {report.damaged or 'none found'}")
    for version in report.registered:
        print(f"{args.name}: registered {version} from its manifest")
    for line in report.unreadable:
        print(f"{args.name}: NOT RECOVERED (damaged manifest): {line}")
    for version in report.missing:
        print(f"{args.name}: NOT RECOVERED: {version} is in the refs but its manifest is missing")
    if report.lost:
        print(f"{args.name}: NOT RECOVERED: {report.lost}")
    if not report.changed:
        print(f"{args.name}: nothing to repair")
    else:
        refs = store.load_refs(args.name)
        print(f"{args.name}: refs rebuilt: {len(refs.versions)} version(s), latest -> {refs.tags.get('latest', 'none')}")
    return 1 if report.unreadable or report.missing or report.lost else 0


def _guarded(func: Any) -> Any:
    """Run a subcommand with object-store failures (endpoint down, no credentials, access denied)
    turned into one-line errors."""

    def run(args: argparse.Namespace) -> int:
        with store_errors(getattr(args, "store", None) or default_store()):
            return func(args)

    return run


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from corpus.tokenizer import train_bpe
    from corpus.training_text import iter_config_texts
    from cpt.fs import open_fs

    texts = (t for path in args.config for t in iter_config_texts(load_config(path, {"tokenizer": "-"}), args.max_docs))
    data = train_bpe(texts, args.vocab_size)
    fs, path = open_fs(args.out)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
    print(f"wrote {args.out} (vocab {args.vocab_size})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from corpus.demo import build_demo

    build_demo(args.store or default_store(), args.raw, args.workers)
    return 0
