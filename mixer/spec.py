"""Blend specs: parse (YAML/TOML/dict), validate, and resolve refs to immutable version ids.

A spec names its sources as ``dataset@ref`` in a store; :func:`resolve` opens every source once,
pins the version id, checks that all sources share one tokenizer and can fill a sample, and
returns a :class:`ResolvedBlend` whose JSON form is what a run records. The stream is a pure
function of the resolved blend's :attr:`ResolvedBlend.fingerprint` (store URLs are not part of
it: the same version read from a local folder or from S3 gives the same bytes).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import yaml

from moe_cpt.errors import ConfigError, CptError
from moe_cpt.fs import absolute_url, dumps_canonical, read_json
from moe_cpt.hashing import sha256_hex
from moe_cpt.mixer.blocks import retry_call
from moe_cpt.mixer.holdout import Holdout, auto_tokens, choose_holdout
from moe_cpt.mixer.replay import REPLAY_MODES, RUN_RECORD, SeenReplay, seen_counts
from moe_cpt.mixer.schedule import Knot, WeightSchedule
from moe_cpt.mixer.state import find_states
from moe_cpt.store.object_store import parse_ref
from moe_cpt.store.reader import DatasetVersion, open_dataset

ALGORITHM = "moe-cpt/mixer-v1"  # bump when the mapping spec -> stream changes
MAX_SEQ_LEN = 1 << 20


@dataclass(frozen=True)
class SourceSpec:
    name: str  # label used in weights, logs and provenance
    dataset: str  # name@ref as written, or name@version once resolved
    store: str
    weight: float = 1.0
    holdout_tokens: int | str = "auto"  # held-out (validation) tokens of the version, or "auto"
    replay: str = "fresh"  # "fresh": a new shuffle of the version; "seen": the windows a parent run saw
    seen_by: str | None = None  # seen: the parent run's output folder (holding run.json)
    seen_step: int | None = None  # seen: the parent step to replay up to (default: its end_step)


@dataclass(frozen=True)
class BlendSpec:
    sources: tuple[SourceSpec, ...]
    seq_len: int
    global_batch_size: int
    seed: int = 0
    shuffle_blocks: int = 8  # blocks per shuffle window (windows are shuffled within it)
    schedule: tuple[Knot, ...] = ()  # empty: constant weights from the sources

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def weight_schedule(self) -> WeightSchedule:
        knots = list(self.schedule) or [Knot(0, tuple(s.weight for s in self.sources))]
        return WeightSchedule(knots, self.names)


@dataclass(frozen=True)
class ResolvedSource:
    name: str
    dataset: str
    version: str
    store: str
    n_tokens: int
    n_blocks: int
    holdout: Holdout = Holdout()
    replay: SeenReplay | None = None  # set for a ``replay: seen`` source (None: fresh)

    @property
    def spec(self) -> str:
        return f"{self.dataset}@{self.version}"

    @property
    def replay_mode(self) -> str:
        return self.replay.mode if self.replay else "fresh"


@dataclass(frozen=True)
class ResolvedBlend:
    spec: BlendSpec
    sources: tuple[ResolvedSource, ...]
    tokenizer_sha256: str
    eos_id: int
    vocab_size: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def names(self) -> list[str]:
        return self.spec.names

    def content(self) -> dict[str, Any]:
        """What defines the stream (hashed into the fingerprint): no store URLs."""
        return {
            "algorithm": ALGORITHM,
            "seq_len": self.spec.seq_len,
            "global_batch_size": self.spec.global_batch_size,
            "seed": self.spec.seed,
            "shuffle_blocks": self.spec.shuffle_blocks,
            "sources": [_source_content(s, src) for s, src in zip(self.sources, self.spec.sources, strict=True)],
            "schedule": [{"step": k.step, "weights": dict(zip(self.names, k.weights, strict=True))}
                         for k in self.spec.schedule],
            "tokenizer_sha256": self.tokenizer_sha256,
        }

    @property
    def fingerprint(self) -> str:
        return sha256_hex(dumps_canonical(self.content()))[:16]

    def to_json(self) -> dict[str, Any]:
        d = self.content()
        d["fingerprint"] = self.fingerprint
        d["resolved"] = True
        d["eos_id"] = self.eos_id
        d["vocab_size"] = self.vocab_size
        for entry, s in zip(d["sources"], self.sources, strict=True):
            entry["store"] = s.store
            if s.replay:
                entry["seen_by"] = s.replay.seen_by
        return d


def _source_content(s: ResolvedSource, src: SourceSpec) -> dict[str, Any]:
    """One source's part of :meth:`ResolvedBlend.content`; a fresh source has no ``replay`` key,
    so blends without seen replay keep the fingerprints they had before the mode existed."""
    d = {"name": s.name, "dataset": s.dataset, "version": s.version, "weight": src.weight,
         "n_tokens": s.n_tokens, "n_blocks": s.n_blocks, "holdout": s.holdout.to_json()}
    if s.replay:
        d["replay"] = s.replay.to_json()
    return d


# ---- parsing ---------------------------------------------------------------------------------

def _int(d: dict, key: str, default: int | None = None, minimum: int = 0) -> int:
    if key not in d:
        if default is None:
            raise ConfigError(f"blend spec: missing required key {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"blend spec: {key} must be an integer >= {minimum} (got {v!r})")
    return v


def _weight(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"blend spec: weight of {where} must be a number (got {v!r})")
    v = float(v)
    if not (v >= 0) or v == float("inf"):
        raise ConfigError(f"blend spec: weight of {where} must be finite and >= 0 (got {v})")
    return v


def _holdout(v: Any, where: str) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"blend spec: holdout_tokens of {where} must be 'auto' or an integer >= 0 (got {v!r})")
    return v


SOURCE_KEYS = {"dataset", "version", "weight", "store", "holdout_tokens", "replay", "seen_by", "seen_step"}
RESOLVED_SOURCE_KEYS = {"name", "holdout", "n_tokens", "n_blocks"}  # list form (resolved blends)


def _replay(s: dict, name: str) -> tuple[str, str | None, int | None]:
    """``(mode, seen_by, seen_step)`` of a source entry. ``replay`` is ``fresh`` (default) or
    ``seen``; a resolved blend's entry holds the pinned record (a mapping with ``mode``)."""
    raw = s.get("replay", "fresh")
    pinned = raw if isinstance(raw, dict) else {}
    mode = pinned.get("mode") if isinstance(raw, dict) else raw
    if mode not in REPLAY_MODES:
        raise ConfigError(f"blend spec: source {name!r}: replay must be one of {', '.join(REPLAY_MODES)} (got {mode!r})")
    if mode == "fresh":
        extra = [k for k in ("seen_by", "seen_step") if k in s]
        if extra:
            raise ConfigError(f"blend spec: source {name!r}: {', '.join(extra)} only apply with replay: seen")
        return mode, None, None
    seen_by = s.get("seen_by")
    if not isinstance(seen_by, str) or not seen_by:
        raise ConfigError(f"blend spec: source {name!r}: replay: seen needs seen_by: PATH "
                          f"(the parent run's output folder holding {RUN_RECORD})")
    step = s.get("seen_step", pinned.get("seen_step"))
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ConfigError(f"blend spec: source {name!r}: seen_step must be an integer >= 0 (got {step!r})")
    return mode, absolute_url(seen_by), step


def load_spec_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read blend spec {p}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text.decode()) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"blend spec {p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"blend spec {p}: expected a mapping at the top level")
    return data


def parse_spec(data: dict[str, Any], base_store: str | None = None) -> BlendSpec:
    """Validate a spec mapping (see docs/mixer.md) into a :class:`BlendSpec`."""
    known = {"store", "sources", "seq_len", "global_batch_size", "seed", "shuffle_blocks",
             "schedule", "holdout_tokens", "resolved", "fingerprint", "algorithm", "tokenizer_sha256", "eos_id",
             "vocab_size"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"blend spec: unknown key(s) {', '.join(unknown)}")
    store = data.get("store", base_store)
    default_holdout = _holdout(data.get("holdout_tokens", "auto"), "the blend")
    raw_sources = data.get("sources")
    if isinstance(raw_sources, list):  # resolved form / list form: [{name, dataset, ...}]
        items = [(s.get("name") if isinstance(s, dict) else None, s) for s in raw_sources]
    elif isinstance(raw_sources, dict):
        items = list(raw_sources.items())
    else:
        raise ConfigError("blend spec: 'sources' must map source names to {dataset, weight}")
    if not items:
        raise ConfigError("blend spec: no sources")
    sources = []
    for name, s in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"blend spec: every source needs a name (got {name!r})")
        if isinstance(s, str):
            s = {"dataset": s}
        if not isinstance(s, dict) or "dataset" not in s:
            raise ConfigError(f"blend spec: source {name!r} needs a 'dataset: name@ref'")
        bad = sorted(set(s) - SOURCE_KEYS - (RESOLVED_SOURCE_KEYS if isinstance(raw_sources, list) else set()))
        if bad:
            raise ConfigError(f"blend spec: source {name!r} has unknown key(s) {', '.join(bad)} "
                              f"(known: {', '.join(sorted(SOURCE_KEYS))})")
        ds = s["dataset"] if "version" not in s else f"{s['dataset']}@{s['version']}"
        parse_ref(str(ds))  # validates the name
        src_store = s.get("store", store)
        if not src_store:
            raise ConfigError(f"blend spec: no store for source {name!r} (set 'store' at the top or per source)")
        sources.append(SourceSpec(name, str(ds), absolute_url(str(src_store)), _weight(s.get("weight", 1.0), name),
                                  _holdout(s.get("holdout_tokens", default_holdout), name), *_replay(s, name)))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"blend spec: duplicate source names in {names}")
    knots: list[Knot] = []
    for i, k in enumerate(data.get("schedule") or []):
        if not isinstance(k, dict) or not isinstance(k.get("weights"), dict):
            raise ConfigError(f"blend spec: schedule entry {i} needs 'step' and 'weights: {{source: w}}'")
        extra = sorted(set(k["weights"]) - set(names))
        if extra:
            raise ConfigError(f"blend spec: schedule step {k.get('step')} names unknown source(s) {', '.join(extra)}")
        knots.append(Knot(_int(k, "step"), tuple(_weight(k["weights"].get(n, 0.0), f"{n} at step {k.get('step')}") for n in names)))
    spec = BlendSpec(
        sources=tuple(sources),
        seq_len=_int(data, "seq_len", minimum=1),
        global_batch_size=_int(data, "global_batch_size", minimum=1),
        seed=_int(data, "seed", 0),
        shuffle_blocks=_int(data, "shuffle_blocks", 8, minimum=1),
        schedule=tuple(sorted(knots, key=lambda k: k.step)),
    )
    if spec.seq_len > MAX_SEQ_LEN:
        raise ConfigError(f"blend spec: seq_len {spec.seq_len} is larger than the maximum {MAX_SEQ_LEN}")
    spec.weight_schedule()  # validates weights (negative, all zero, knots)
    return spec


def load_spec(spec: str | Path | dict[str, Any] | BlendSpec) -> BlendSpec:
    if isinstance(spec, BlendSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    return parse_spec(load_spec_file(spec))


# ---- resolution ------------------------------------------------------------------------------

def open_sources(blend: ResolvedBlend) -> list[DatasetVersion]:
    """Open every source at its pinned version (checks the manifests still match)."""
    out = []
    for s in blend.sources:
        ds = _open(s.store, s.spec, s.name)
        if ds.version != s.version or ds.manifest.n_tokens != s.n_tokens:
            raise ConfigError(f"source {s.name}: {s.spec} in {s.store} does not match the resolved blend")
        out.append(ds)
    return out


def _open(store: str, ref: str, name: str, retries: int = 4) -> DatasetVersion:
    try:
        return retry_call(lambda: open_dataset(store, ref), f"open {ref} in {store}", retries)
    except CptError as exc:
        raise type(exc)(f"source {name!r} ({ref} in {store}): {exc}") from exc


def _choose_holdout(s: SourceSpec, ds: DatasetVersion, min_train_tokens: int) -> Holdout:
    tokens = auto_tokens(ds.manifest.n_tokens) if s.holdout_tokens == "auto" else int(s.holdout_tokens)
    refs = list(ds.block_refs())

    def doc_starts(block: int) -> np.ndarray:
        tb = retry_call(lambda: ds.read_block(refs[block]), f"read {ds.describe(refs[block])}")
        return np.concatenate([[0], tb.doc_ends[:-1]])

    try:
        return choose_holdout(ds.version, ds.block_tokens(), tokens, doc_starts, min_train_tokens)
    except ConfigError as exc:
        raise ConfigError(f"source {s.name!r} ({ds.spec}): {exc}") from exc


def _resolve_source(s: SourceSpec, ds: DatasetVersion, bs: BlendSpec) -> ResolvedSource:
    if s.replay != "seen":
        return ResolvedSource(s.name, ds.name, ds.version, s.store, ds.manifest.n_tokens, ds.manifest.n_blocks,
                              _choose_holdout(s, ds, bs.seq_len + 1))
    replay = _resolve_seen(s, ds, bs)
    # the parent's hold-out of the version: the same validation tokens, never trained on
    if s.holdout_tokens != "auto" and _choose_holdout(s, ds, bs.seq_len + 1) != replay.holdout:
        raise ConfigError(f"source {s.name!r} (replay: seen): holdout_tokens {s.holdout_tokens} gives another "
                          f"held-out split of {ds.spec} than the parent's ({replay.holdout.tokens} tokens); "
                          f"leave it 'auto' to keep the parent's")
    return ResolvedSource(s.name, ds.name, ds.version, s.store, ds.manifest.n_tokens, ds.manifest.n_blocks,
                          replay.holdout, replay)


def _read_parent_record(seen_by: str, where: str) -> dict[str, Any]:
    """The parent's ``run.json`` (a local folder or an fsspec URL)."""
    try:
        fs, path = fsspec.core.url_to_fs(seen_by)
        record = read_json(fs, f"{path.rstrip('/')}/{RUN_RECORD}")
    except (CptError, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read the parent's {RUN_RECORD}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: the parent's {RUN_RECORD} is not a run record")
    return record


def _parent_blend(record: dict[str, Any], where: str) -> ResolvedBlend:
    data = record.get("data")
    if not isinstance(data, dict) or data.get("kind") != "mixer" or not isinstance(data.get("blend"), dict):
        kind = data.get("kind") if isinstance(data, dict) else None
        raise ConfigError(f"{where}: the parent run did not read a mixer blend (data.kind {kind!r}): nothing to replay")
    try:
        return blend_from_json(data["blend"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: the parent's recorded blend is unusable: {exc}") from exc


def _parent_step(record: dict[str, Any], want: int | None, where: str) -> int:
    end = record.get("end_step")
    if isinstance(end, bool) or not isinstance(end, int) or end < 0:
        raise ConfigError(f"{where}: the parent's {RUN_RECORD} has no end_step (got {end!r})")
    if want is not None and want > end:
        raise ConfigError(f"{where}: seen_step {want} is beyond the parent's last step {end}")
    return end if want is None else want


def _check_parent_state(data: dict[str, Any], parent: ResolvedBlend, step: int, counts: tuple[int, ...],
                        where: str) -> None:
    """If the record's mixer state is at ``step``, its counts must be the schedule's."""
    for st in find_states(data.get("state")):
        if st.get("blend") == parent.fingerprint and st.get("step") == step and \
                tuple(st.get("counts") or ()) != counts:
            raise ConfigError(f"{where}: the parent's recorded mixer state at step {step} has counts "
                              f"{st.get('counts')}, its blend's schedule gives {list(counts)}")


def _resolve_seen(s: SourceSpec, ds: DatasetVersion, bs: BlendSpec) -> SeenReplay:
    """Pin what a ``replay: seen`` source replays: the windows of ``ds``'s version that the
    parent run in ``s.seen_by`` consumed before ``s.seen_step`` (default: its end_step)."""
    assert s.seen_by is not None  # parse_spec requires it
    where = f"source {s.name!r} (replay: seen, seen_by {s.seen_by})"
    record = _read_parent_record(s.seen_by, where)
    run_id = record.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"{where}: the parent's {RUN_RECORD} has no run_id")
    parent = _parent_blend(record, where)
    matches = [k for k, ps in enumerate(parent.sources) if ps.dataset == ds.name and ps.version == ds.version]
    if not matches:
        raise ConfigError(f"{where}: the parent run {run_id} never read {ds.spec} "
                          f"(it read {', '.join(ps.spec for ps in parent.sources)})")
    if len(matches) > 1:
        names = ", ".join(parent.sources[k].name for k in matches)
        raise ConfigError(f"{where}: the parent run {run_id} read {ds.spec} as several sources ({names}); "
                          f"replay: seen needs exactly one")
    ps = parent.sources[matches[0]]
    if ps.replay is not None:
        raise ConfigError(f"{where}: the parent's source {ps.name!r} is itself a replay: seen source; "
                          f"replay the run it replayed instead")
    if parent.spec.seq_len != bs.seq_len:
        raise ConfigError(f"{where}: seq_len {bs.seq_len} differs from the parent's {parent.spec.seq_len} "
                          f"(the parent's windows would not be the replayed ones)")
    step = _parent_step(record, s.seen_step, where)
    counts = seen_counts(parent.spec.weight_schedule(), parent.spec.global_batch_size, len(parent.sources), step)
    _check_parent_state(record["data"], parent, step, counts, where)
    n_seen = counts[matches[0]]
    if n_seen == 0:
        raise ConfigError(f"{where}: the parent run {run_id} consumed no samples of {ds.spec} "
                          f"in its first {step} steps")
    return SeenReplay(run_id, parent.fingerprint, ps.name, parent.spec.seq_len, parent.spec.seed,
                      f"{ps.name}:{ps.version}", parent.spec.shuffle_blocks, ps.holdout, step, n_seen, s.seen_by)


def resolve(spec: str | Path | dict[str, Any] | BlendSpec) -> tuple[ResolvedBlend, list[DatasetVersion]]:
    """Pin every ``dataset@ref`` to its version id and validate the blend against the data."""
    bs = load_spec(spec)
    opened: list[DatasetVersion] = []
    for s in bs.sources:
        opened.append(_open(s.store, s.dataset, s.name))
    toks = {ds.manifest.tokenizer.sha256 for ds in opened}
    if len(toks) > 1:
        detail = ", ".join(f"{s.name}={ds.manifest.tokenizer.name}:{ds.manifest.tokenizer.sha256[:12]}"
                           for s, ds in zip(bs.sources, opened, strict=True))
        raise ConfigError(f"sources were tokenized with different tokenizers ({detail})")
    for s, ds in zip(bs.sources, opened, strict=True):
        if ds.manifest.n_tokens < bs.seq_len + 1:
            raise ConfigError(
                f"seq_len {bs.seq_len} is too large: source {s.name!r} ({ds.spec}) holds only "
                f"{ds.manifest.n_tokens} tokens, fewer than one sample of seq_len+1"
            )
    resolved_sources = tuple(_resolve_source(s, ds, bs) for s, ds in zip(bs.sources, opened, strict=True))
    pinned = BlendSpec(
        sources=tuple(SourceSpec(s.name, f"{ds.name}@{ds.version}", s.store, s.weight, s.holdout_tokens,
                                 r.replay_mode, s.seen_by, r.replay.seen_step if r.replay else None)
                      for s, ds, r in zip(bs.sources, opened, resolved_sources, strict=True)),
        seq_len=bs.seq_len, global_batch_size=bs.global_batch_size, seed=bs.seed,
        shuffle_blocks=bs.shuffle_blocks, schedule=bs.schedule,
    )
    tok = opened[0].manifest.tokenizer
    return ResolvedBlend(pinned, resolved_sources, tok.sha256, tok.eos_id, tok.vocab_size), opened


def blend_from_json(d: dict[str, Any]) -> ResolvedBlend:
    """Rebuild a :class:`ResolvedBlend` from :meth:`ResolvedBlend.to_json` (no store access)."""
    if not d.get("resolved"):
        raise ConfigError("not a resolved blend (run `cpt mix resolve SPEC` first)")
    if d.get("algorithm") != ALGORITHM:
        raise ConfigError(f"resolved blend uses mixer algorithm {d.get('algorithm')!r}; this code is {ALGORITHM!r}")
    spec = parse_spec({k: v for k, v in d.items() if k != "sources"} | {
        "sources": [{"name": s["name"], "dataset": f"{s['dataset']}@{s['version']}",
                     "store": s["store"], "weight": s["weight"]}
                    | ({k: s[k] for k in ("replay", "seen_by") if k in s} if s.get("replay") else {})
                    for s in d["sources"]]})
    blend = ResolvedBlend(
        spec,
        tuple(ResolvedSource(s["name"], s["dataset"], s["version"], s["store"], s["n_tokens"], s["n_blocks"],
                             Holdout.from_json(s.get("holdout")),
                             SeenReplay.from_json(s["replay"], str(s.get("seen_by") or "")) if s.get("replay") else None)
              for s in d["sources"]),
        d["tokenizer_sha256"], d["eos_id"], d["vocab_size"],
    )
    if d.get("fingerprint") and d["fingerprint"] != blend.fingerprint:
        raise ConfigError(f"resolved blend was modified: fingerprint {d['fingerprint']} != {blend.fingerprint}")
    return blend


def spec_dict(blend: ResolvedBlend) -> dict[str, Any]:
    return asdict(blend.spec)
