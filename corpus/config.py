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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from corpus.shard_set import PackingConfig
from corpus.store import check_name
from cpt.errors import ConfigError

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

    def identity(self) -> dict[str, Any]:
        """The fields that define the data (what goes into the manifest and build key)."""
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    nested = {
        "clean": CleanConfig,
        "dedup": DedupConfig,
        "minhash": MinhashSettings,
        "packing": PackingConfig,
    }
    kwargs = {}
    for key, value in data.items():
        if key in nested:
            value = _build(nested[key], value, f"{where}.{key}")
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
    if not raw_inputs:
        raise ConfigError(f"{where}: `inputs` is empty")
    inputs = []
    for i, item in enumerate(raw_inputs):
        item = {"url": item} if isinstance(item, str) else item
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
    if cfg.tasks < 1:
        raise ConfigError(f"{where}: tasks must be >= 1")
    if cfg.packing.block_tokens < 1 or cfg.packing.shard_bytes < 1:
        raise ConfigError(f"{where}: packing sizes must be positive")
    if cfg.clean.min_chars < 0:
        raise ConfigError(f"{where}: clean.min_chars must be >= 0")


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
            rel(i) if isinstance(i, str) else {**i, "url": rel(i["url"])} if isinstance(i, dict) and "url" in i else i
            for i in inputs
        ]
    return config_from_dict(data, str(path))
