"""`cpt corpus ...`: build, list, inspect, verify and tag dataset versions; train tokenizers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from moe_cpt.corpus.card import write_card
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.corpus.executor_check import check_executor
from moe_cpt.corpus.export import FORMATS as EXPORT_FORMATS
from moe_cpt.corpus.export import export_version
from moe_cpt.corpus.progress import human, print_stats, run_build
from moe_cpt.errors import ConfigError, CptError
from moe_cpt.fs import store_errors
from moe_cpt.store.documents import DocumentIndex
from moe_cpt.store.object_store import DEFAULT_STORE, Store, default_store
from moe_cpt.store.reader import open_dataset
from moe_cpt.store.sample import format_document, sample_documents
from moe_cpt.store.verify import verify_version


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
    p.add_argument("--card", nargs="?", const="", default=None, metavar="OUT",
                   help="write a Markdown dataset card (README.md + token_lengths.png) into folder OUT "
                   "(local or s3://; default ./<name>-<version>-card)")
    p.set_defaults(func=_guarded(cmd_show))

    p = csub.add_parser("sample", help="documents decoded back to text, with provenance",
                        description="Decode documents of a version with its own tokenizer and print each with "
                        "its doc id, source file, shard, block and token count. Reads only their blocks.")
    p.add_argument("ref", metavar="NAME@REF")
    _store_arg(p)
    p.add_argument("-n", type=int, default=3, help="how many documents (default 3), drawn at random with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0: the same documents every time)")
    p.add_argument("--source-doc", metavar="ID", default=None, help="show the document(s) with this doc id instead")
    p.add_argument("--max-chars", type=int, default=2000,
                   help="cut each text after this many characters (default 2000; 0 = whole text)")
    p.add_argument("--json", action="store_true", help="one JSON object per document (whole text)")
    p.set_defaults(func=_guarded(cmd_sample))

    p = csub.add_parser("export", help="export a version to Megatron-LM .bin/.idx or HF datasets Parquet",
                        description="Write every document (EOS included, storage order) into folder OUT (local "
                        "or s3://): megatron -> OUT/<name>.bin/.idx (+ documents.parquet), hf -> "
                        "OUT/data/train-*.parquet (input_ids, doc_id, source); both -> tokenizer.json and "
                        "export.json (written last).")
    p.add_argument("ref", metavar="NAME@REF")
    p.add_argument("out", metavar="OUT", help="output folder (path or URL)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="megatron or hf")
    _store_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    p.set_defaults(func=_guarded(cmd_export))

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
            table.add_row(item.name, version, tags, human(m.n_docs), human(m.n_tokens), human(m.nbytes, "B"),
                          str(m.build.get("created_at", "")))
    console.print(table)
    for line in damaged:
        print(line)
    return 1 if damaged else 0


def cmd_show(args: argparse.Namespace) -> int:
    store = Store(args.store or default_store())
    name, version = store.resolve(args.ref)
    manifest = store.load_manifest(name, version)
    if args.json and args.card is not None:
        raise ConfigError("--json and --card do not go together")
    if args.json:
        sys.stdout.write(manifest.to_json_bytes().decode())
        return 0
    if args.card is not None:
        return _write_card(store, name, version, args.card)
    console = Console()
    print_stats(console, name, version, manifest)
    console.print(f"inputs: {len(manifest.inputs)} file(s), {sum(i.get('size', 0) or 0 for i in manifest.inputs):,} bytes; "
                  f"built {manifest.build.get('created_at', '?')} by {json.dumps(manifest.build.get('code', {}))}")
    from moe_cpt.provenance.catalog import RunCatalog

    consumers = RunCatalog(store.url).runs_for_version(name, version)
    console.print(f"runs that read it: {', '.join(consumers) or 'none'}"
                  + (f" (see `cpt runs show RUN --store {store.url}`)" if consumers else ""))
    return 0


def _write_card(store: Store, name: str, version: str, out: str) -> int:
    ds = open_dataset(store.url, f"{name}@{version}")
    tags = sorted(t for t, v in store.load_refs(name).tags.items() if v == version)
    for path in write_card(ds, out or f"{name}-{version}-card", tags):
        print(f"wrote {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    ds = open_dataset(args.store or default_store(), args.ref)
    docs = sample_documents(ds, args.n, args.seed, args.source_doc)
    if not docs:
        print(f"{ds.spec} has no documents")
    for doc in docs:
        if args.json:
            print(json.dumps(doc.to_json(), ensure_ascii=False))
        else:
            print(format_document(doc, args.max_chars))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    ds = open_dataset(args.store or default_store(), args.ref)
    index = DocumentIndex(ds)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"exporting {ds.spec} ({args.format})", total=ds.manifest.n_tokens)
        result = export_version(ds, args.format, args.out, args.overwrite,
                                on_tokens=lambda n: progress.advance(task, n), index=index)
    print(f"exported {ds.spec}: {result.n_docs:,} documents, {result.n_tokens:,} tokens -> {result.out} "
          f"({', '.join(result.files)})")
    if args.format == "megatron":
        print(f"Megatron-LM: --data-path {result.out.rstrip('/')}/{ds.name}")
    else:
        print(f"datasets: load_dataset('parquet', data_dir='{result.out}', split='train')")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.progress import Progress


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
    from moe_cpt.corpus.tokenizer import train_bpe
    from moe_cpt.corpus.training_text import iter_config_texts
    from moe_cpt.fs import open_fs

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
    from moe_cpt.corpus.demo import build_demo

    build_demo(args.store or default_store(), args.raw, args.workers)
    return 0
