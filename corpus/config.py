"""Dataset build configs: a small YAML or TOML file, parsed into dataclasses.

Example (YAML)::

    name: prose
    inputs:
      - url: s3://raw-bucket/prose/      # folder, file or glob; local path, file:// or s3://
        format: jsonl                     # jsonl (.jsonl/.gz/.zst) | parquet | text
    text_field: text
    tokenizer: s3://raw-bucket/tokenizers/llama3.json
    dedup: {exact: true, minhash: {enabled: true}}
    packing: {block_tokens: 1048576, shard_bytes: 134217728}
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_cpt.corpus.shard_writer import PackingConfig
from moe_cpt.errors import ConfigError
from moe_cpt.store.object_store import check_name

MAX_MIN_CHARS = 1 << 16  # far below a block (corpus/blocks.py): every blocked document is long enough

FORMATS = ("jsonl", "parquet", "text")
DEFAULT_GLOBS = {"jsonl": "**/*.jsonl*", "parquet": "**/*.parquet", "text": "**/*"}


@dataclass(frozen=True)
class InputConfig:
    url: str
    format: Literal["jsonl", "parquet", "text"] = "jsonl"
    glob: str | None = None  # relative to url when url is a folder; default per format


@dataclass(frozen=True)
class CleanConfig:
    unicode_normalization: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = "NFC"
    min_chars: int = 1  # documents shorter than this (after stripping) are dropped


@dataclass(frozen=True)
class MinhashSettings:
    enabled: bool = True
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    minhash: MinhashSettings = field(default_factory=MinhashSettings)


@dataclass(frozen=True)
class ExecutorConfig:
    """How datatrove runs the tasks: locally (default) or on Slurm / Ray (see docs/corpus.md)."""

    kind: Literal["local", "slurm", "ray"] = "local"
    workers: int = 2  # local: processes at once
    options: dict[str, Any] = field(default_factory=dict)  # passed to the datatrove executor


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    inputs: tuple[InputConfig, ...]
    tokenizer: str
    text_field: str = "text"
    id_field: str = "id"
    eos_token: str | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    tasks: int = 4  # datatrove tasks; part of the data's identity (files are split by task)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    allow_empty: bool = False  # publish a version with 0 documents instead of refusing
    license: str | None = None  # e.g. "CC-BY-4.0"; shown on the dataset card

    def identity(self) -> dict[str, Any]:
        """The fields that define the data (what goes into the manifest and build key);
        ``allow_empty`` is a publishing policy, not part of the data. ``license`` is recorded
        only when set, so configs without one keep the version ids they always had."""
        d = dataclasses.asdict(self)
        d.pop("allow_empty")
        if d["license"] is None:
            d.pop("license")
        return d


NESTED: dict[str, type] = {
    "clean": CleanConfig,
    "dedup": DedupConfig,
    "minhash": MinhashSettings,
    "packing": PackingConfig,
}


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether a parsed YAML/TOML value has the declared field type (no coercion: "4" is no int,
    2.5 is no int, true is no int)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check_type(value: Any, tp: Any, where: str, key: str) -> None:
    if not _matches(value, tp):
        shown = repr(value) if len(repr(value)) < 60 else f"{repr(value)[:57]}..."
        raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {type(value).__name__} {shown}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key in NESTED:
            value = _build(NESTED[key], value, f"{where}.{key}")
        elif key != "inputs":
            _check_type(value, hints[key], where, key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def config_from_dict(data: dict[str, Any], where: str = "config") -> DatasetConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at top level")
    data = dict(data)
    for key in ("name", "inputs", "tokenizer"):
        if key not in data:
            raise ConfigError(f"{where}: missing required key {key!r}")
    raw_inputs = data.pop("inputs")
    if isinstance(raw_inputs, (str, dict)):
        raw_inputs = [raw_inputs]
    if not isinstance(raw_inputs, list):
        raise ConfigError(f"{where}: inputs must be a URL, a mapping or a list of them, "
                          f"got {type(raw_inputs).__name__} {raw_inputs!r}")
    if not raw_inputs:
        raise ConfigError(f"{where}: `inputs` is empty")
    inputs = []
    for i, item in enumerate(raw_inputs):
        item = {"url": item} if isinstance(item, str) else item
        if isinstance(item, dict) and not isinstance(item.get("url"), str):
            raise ConfigError(f"{where}.inputs[{i}]: url must be a string (a path or URL)")
        inp = _build(InputConfig, item, f"{where}.inputs[{i}]")
        if inp.format not in FORMATS:
            raise ConfigError(f"{where}.inputs[{i}]: format must be one of {', '.join(FORMATS)}, got {inp.format!r}")
        inputs.append(inp)
    executor = data.pop("executor", None)
    if executor is not None:
        raise ConfigError(f"{where}: `executor` belongs on the command line / executor file, not the dataset config")
    cfg = _build(DatasetConfig, {**data, "inputs": tuple(inputs)}, where)
    check_name(cfg.name)
    _validate(cfg, where)
    return cfg


def _validate(cfg: DatasetConfig, where: str) -> None:
    if cfg.on_bad_record not in ("fail", "skip"):
        raise ConfigError(f"{where}: on_bad_record must be 'fail' or 'skip'")
    m = cfg.dedup.minhash
    minimums = {"tasks": (cfg.tasks, 1), "packing.block_tokens": (cfg.packing.block_tokens, 1),
                "packing.shard_bytes": (cfg.packing.shard_bytes, 1), "clean.min_chars": (cfg.clean.min_chars, 0),
                "dedup.minhash.n_grams": (m.n_grams, 1), "dedup.minhash.num_buckets": (m.num_buckets, 1),
                "dedup.minhash.hashes_per_bucket": (m.hashes_per_bucket, 1)}
    for key, (value, least) in minimums.items():
        if value < least:
            raise ConfigError(f"{where}: {key} must be an integer >= {least}, got {value}")
    if cfg.clean.min_chars > MAX_MIN_CHARS:  # huge documents are blocks longer than this, all kept
        raise ConfigError(f"{where}: clean.min_chars must be at most {MAX_MIN_CHARS}, got {cfg.clean.min_chars}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DatasetConfig:
    """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) dataset config.

    Relative local paths in ``inputs`` and ``tokenizer`` are taken relative to the config file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at top level, got {type(data).__name__}")
    data = {**(data or {}), **(overrides or {})}
    base = path.parent

    def rel(url: str) -> str:
        if "://" in url or Path(url).is_absolute():
            return url
        return str((base / url).resolve())

    if isinstance(data.get("tokenizer"), str):
        data["tokenizer"] = rel(data["tokenizer"])
    inputs = data.get("inputs")
    if isinstance(inputs, (str, dict)):
        inputs = [inputs]
    if isinstance(inputs, list):
        data["inputs"] = [
            rel(i) if isinstance(i, str)
            else {**i, "url": rel(i["url"])} if isinstance(i, dict) and isinstance(i.get("url"), str) else i
            for i in inputs
        ]
    return config_from_dict(data, str(path))
