"""``replay: seen``: a CPT source that replays exactly the windows a parent run consumed.

The parent is a real resolved blend whose own stream is run for ``PARENT_STEPS`` steps; its
``run.json`` holds what the trainer records (``data`` = the dataset's ``describe()`` + state,
``end_step``, ``run_id``, ``checkpoints``). Every replayed window is checked against the parent's
consumed windows by a digest of its tokens and positions."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from moe_cpt.cli import main
from moe_cpt.errors import ConfigError
from moe_cpt.fs import dumps_canonical
from moe_cpt.hashing import sha256_hex
from moe_cpt.mixer.blocks import CacheConfig
from moe_cpt.mixer.dataset import MixedDataset, open_blend
from moe_cpt.mixer.replay import SeenPacking
from moe_cpt.mixer.schedule import MixPoint, advance, expected_counts
from moe_cpt.mixer.service.client import ClientConfig, ServiceMixedDataset
from moe_cpt.mixer.service.server import MixService, ServiceConfig
from moe_cpt.mixer.spec import ALGORITHM, blend_from_json, resolve
from moe_cpt.mixer.state import MixState
from moe_cpt.mixer.stream import MixStream
from tests.support.mixer_store import spec

PARENT_W = {"replay": 0.6, "code": 0.4}
PARENT_STEPS = 30  # ~432 samples of `replay`: more than two of its ~185-window epochs
PARENT_SHUFFLE = 2  # small parent shuffle windows: several replay chunks per parent epoch
OLD = 1  # index of the seen-replay source in the CPT blend
KEYS = ["tokens", "positions", "source", "sample", "index", "epoch", "shard", "block", "offset"]


def digest(s: dict) -> str:
    return hashlib.sha256(np.asarray(s["tokens"]).tobytes() + np.asarray(s["positions"]).tobytes()).hexdigest()


def key(s: dict) -> tuple:
    return tuple(np.asarray(s[k]).tobytes() if k in ("tokens", "positions") else int(s[k]) for k in KEYS)


def take(ms: MixStream, n: int, state: MixState | None = None) -> tuple[list[dict], MixState]:
    it = ms.samples(state or ms.initial_state())
    out = []
    for _ in range(n):
        s, last = next(it)
        out.append(s)
    it.close()
    return out, last


@dataclass
class Parent:
    dir: Path
    fingerprint: str
    per_step: list[list[tuple[str, tuple[int, int, int]]]]  # step -> digests (+ provenance) of `replay`

    def consumed(self, steps: int = PARENT_STEPS) -> Counter:
        return Counter(d for step in self.per_step[:steps] for d, _ in step)

    def provenance(self) -> dict[str, tuple[int, int, int]]:
        return {d: p for step in self.per_step for d, p in step}


def write_record(run_dir: Path, record: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return run_dir


@pytest.fixture(scope="module")
def parent(mix_store: str, tmp_path_factory: pytest.TempPathFactory) -> Parent:
    blend, dss = open_blend(spec(mix_store, PARENT_W, shuffle_blocks=PARENT_SHUFFLE))
    ms = MixStream(blend, dss, 0, 1, CacheConfig(prefetch_threads=0))
    g = blend.spec.global_batch_size
    samples, last = take(ms, PARENT_STEPS * g)
    ms.close()
    per_step: list[list] = [[] for _ in range(PARENT_STEPS)]
    for s in samples:
        if s["source"] == 0:
            per_step[s["sample"] // g].append((digest(s), (s["shard"], s["block"], s["offset"])))
    md = MixedDataset(blend)
    md.load_state_dict(last.to_dict())
    run_dir = write_record(tmp_path_factory.mktemp("parent") / "out", {
        "run_id": "20261201T000000-parent01", "phase": "pretrain",
        "data": {**md.describe(), "state": last.to_dict()},
        "start_step": 0, "end_step": PARENT_STEPS, "checkpoints": [10, 20, PARENT_STEPS], "status": "finished"})
    return Parent(run_dir, blend.fingerprint, per_step)


def cpt_spec(store: str, parent_dir: Path | str, **old) -> dict:
    d = spec(store, {"new": 0.7})
    d["sources"]["old"] = {"dataset": "replay@latest", "weight": 0.3, "replay": "seen",
                           "seen_by": str(parent_dir), **old}
    return d


_OPENED: dict[str, tuple] = {}


def cpt_blend(store: str, parent: Parent, **old):
    k = json.dumps([store, str(parent.dir), old], sort_keys=True)
    if k not in _OPENED:
        _OPENED[k] = open_blend(cpt_spec(store, parent.dir, **old))
    return _OPENED[k]


def cpt_stream(store: str, parent: Parent, rank: int = 0, world: int = 1, **old) -> MixStream:
    blend, dss = cpt_blend(store, parent, **old)
    return MixStream(blend, dss, rank, world, CacheConfig(prefetch_samples=32, prefetch_threads=2))


def check_epochs(replayed: list[dict], n_seen: int, want: Counter) -> int:
    """Each full replay epoch is exactly the parent's consumed multiset; the last one a part
    of it. Returns the number of full epochs."""
    by_epoch: dict[int, Counter] = {}
    for s in replayed:
        assert s["epoch"] == s["index"] // n_seen
        by_epoch.setdefault(s["epoch"], Counter())[digest(s)] += 1
    assert sorted(by_epoch) == list(range(len(by_epoch)))
    full = sum(1 for e in by_epoch if sum(by_epoch[e].values()) == n_seen)
    for e, got in by_epoch.items():
        if e < full:
            assert got == want, f"epoch {e} is not the parent's consumed set"
        else:
            assert not got - want, f"epoch {e} replays windows the parent never consumed"
    return full


# ---- (1) replayed windows are the parent's, each epoch covers them once ---------------------

def test_seen_replay_draws_exactly_the_windows_the_parent_consumed(mix_store: str, parent: Parent) -> None:
    ms = cpt_stream(mix_store, parent)
    r = ms.blend.sources[OLD].replay
    want = parent.consumed()
    n_parent = sum(want.values())
    parent_blend = blend_from_json(json.loads((parent.dir / "run.json").read_text())["data"]["blend"])
    counts = advance(MixPoint.start(2), parent_blend.spec.weight_schedule(), 24, PARENT_STEPS).counts
    assert r.n_seen == n_parent == counts[0] and r.seen_step == PARENT_STEPS
    assert n_parent > 2 * ms.packings[OLD].parent.windows_per_epoch  # the parent ran > 2 epochs of it
    assert (r.parent_run_id, r.parent_blend, r.parent_source) == ("20261201T000000-parent01", parent.fingerprint,
                                                                  "replay")
    assert ms.packings[OLD].windows_per_epoch == r.n_seen
    samples, _ = take(ms, 190 * 24)  # ~3.1 replay epochs at weight 0.3
    ms.close()
    replayed = [s for s in samples if s["source"] == OLD]
    assert check_epochs(replayed, r.n_seen, want) >= 3
    prov = parent.provenance()
    assert all((s["shard"], s["block"], s["offset"]) == prov[digest(s)] for s in replayed)
    assert [s["index"] for s in replayed] == list(range(len(replayed)))
    # the order differs between epochs (a fresh permutation each)
    n = r.n_seen
    assert [digest(s) for s in replayed[:n]] != [digest(s) for s in replayed[n:2 * n]]


def test_replay_chunks_keep_the_working_set_to_a_parent_shuffle_window(mix_store: str, parent: Parent) -> None:
    ms = cpt_stream(mix_store, parent)
    pk = ms.packings[OLD]
    assert isinstance(pk, SeenPacking) and len(pk.sizes) > 6
    n_blocks = len({(s, b) for s, b in ((p[0], p[1]) for p in parent.provenance().values())})
    for e in range(3):
        order, cum = pk.epoch(e)
        for slot in range(len(order)):
            js = np.arange(e * pk.windows_per_epoch + cum[slot], e * pk.windows_per_epoch + cum[slot + 1])
            _, ps = pk.parent_indices(js)
            c = int(order[slot])
            assert sorted(ps.tolist()) == list(range(pk.starts[c], pk.starts[c] + pk.sizes[c]))
            blocks = {int(b) for b in pk.locate_many(js)[2]}
            assert len(blocks) <= PARENT_SHUFFLE + 1 < n_blocks
    ms.close()


# ---- (2) seen_step: only the prefix ----------------------------------------------------------

def test_seen_step_replays_only_the_prefix(mix_store: str, parent: Parent) -> None:
    ms = cpt_stream(mix_store, parent, seen_step=8)
    r = ms.blend.sources[OLD].replay
    want = parent.consumed(8)
    assert r.seen_step == 8 and r.n_seen == sum(want.values()) < sum(parent.consumed().values())
    samples, _ = take(ms, 60 * 24)
    ms.close()
    replayed = [s for s in samples if s["source"] == OLD]
    assert check_epochs(replayed, r.n_seen, want) >= 3
    assert ms.fingerprint != cpt_blend(mix_store, parent)[0].fingerprint


# ---- (3) proportions ---------------------------------------------------------------------------

def test_proportions_are_those_of_the_fresh_blend(mix_store: str, parent: Parent) -> None:
    seen = cpt_stream(mix_store, parent)
    fresh_spec = cpt_spec(mix_store, parent.dir)
    for k in ("replay", "seen_by"):
        del fresh_spec["sources"]["old"][k]
    fb, fdss = open_blend(fresh_spec)
    fresh = MixStream(fb, fdss, 0, 1, CacheConfig(prefetch_threads=0))
    assert fb.sources[OLD].replay is None and fb.fingerprint != seen.fingerprint
    steps = 80
    a, last = take(seen, steps * 24)
    b, _ = take(fresh, steps * 24)
    seen.close()
    fresh.close()
    assert [s["source"] for s in a] == [s["source"] for s in b]
    quota = expected_counts(seen.schedule, 24, steps)
    assert all(abs(c - q) <= 1 for c, q in zip(last.point.counts, quota, strict=True))


# ---- (4) resume, elastic, batched ---------------------------------------------------------------

def global_stream(store: str, parent: Parent, world: int, steps: int) -> list[tuple]:
    out = []
    for r in range(world):
        ms = cpt_stream(store, parent, r, world)
        out += [key(s) for s in take(ms, steps * 24 // world)[0]]
        ms.close()
    return sorted(out, key=lambda k: k[3])


def test_world_sizes_give_one_global_stream(mix_store: str, parent: Parent) -> None:
    one = global_stream(mix_store, parent, 1, 70)  # crosses a replay epoch (~504 > 432 samples)
    assert max(k[5] for k in one if k[2] == OLD) >= 1
    assert global_stream(mix_store, parent, 2, 70) == one
    assert global_stream(mix_store, parent, 4, 70) == one


def test_resume_anywhere_equals_uninterrupted(mix_store: str, parent: Parent) -> None:
    ms = cpt_stream(mix_store, parent, 1, 2)
    full, _ = take(ms, 900)
    ms.close()
    rng = np.random.default_rng(3)
    for at in [0, 1, 11, 12, *rng.integers(13, 840, size=5).tolist()]:
        a = cpt_stream(mix_store, parent, 1, 2)
        _, state = take(a, at) if at else (None, a.initial_state())
        a.close()
        b = cpt_stream(mix_store, parent, 1, 2)
        got, _ = take(b, 60, MixState.from_dict(json.loads(json.dumps(state.to_dict()))))
        b.close()
        assert [key(s) for s in got] == [key(s) for s in full[at:at + 60]], at
    # elastic: a step-boundary state of world 2 continues on world 4
    a = cpt_stream(mix_store, parent, 0, 2)
    _, state = take(a, 12 * 25)
    a.close()
    want = global_stream(mix_store, parent, 1, 31)[25 * 24:]
    got = []
    for r in range(4):
        b = cpt_stream(mix_store, parent, r, 4)
        got += [key(s) for s in take(b, 36, b.check_state(state))[0]]
        b.close()
    assert sorted(got, key=lambda k: k[3]) == want


def test_batches_equal_samples(mix_store: str, parent: Parent) -> None:
    ms = cpt_stream(mix_store, parent, 1, 2)
    want, _ = take(ms, 40 * 5)
    ms.close()
    ms = cpt_stream(mix_store, parent, 1, 2)
    it = ms.batches(ms.initial_state(), (0, 1, 5))
    got = []
    for _ in range(40):
        batch, _ = next(it)
        got += [{k: batch[k][i] for k in KEYS} for i in range(5)]
    it.close()
    ms.close()
    assert [key(s) for s in got] == [key(s) for s in want]
    assert any(s["source"] == OLD and s["epoch"] == 0 for s in got)


def test_dataset_from_the_recorded_blend_needs_no_parent(mix_store: str, parent: Parent, tmp_path: Path) -> None:
    """A resumed run rebuilds from the recorded resolved blend: the parent's run.json is not read."""
    moved = shutil.copytree(parent.dir, tmp_path / "p")
    blend, _ = resolve(cpt_spec(mix_store, moved))
    recorded = json.loads(json.dumps(MixedDataset(blend).describe()))
    assert recorded["blend"]["sources"][OLD]["replay"]["mode"] == "seen"
    shutil.rmtree(moved)
    ds = MixedDataset(recorded["blend"], rank=0, world_size=1)
    ms = cpt_stream(mix_store, parent)
    assert ds.blend.fingerprint == ms.fingerprint  # where the parent lived is not in the fingerprint
    it = iter(ds)
    got = [next(it) for _ in range(300)]
    want, state = take(ms, 300)
    ms.close()
    ds.close()
    assert [key(s) for s in got] == [key(s) for s in want]
    assert ds.state_dict() == state.to_dict()
    n_seen = blend.sources[OLD].replay.n_seen
    assert ds.epochs()["old"] == pytest.approx(state.point.counts[OLD] / n_seen)


# ---- (5) fresh blends keep their fingerprints --------------------------------------------------

def old_content(d: dict) -> dict:
    """The resolved-blend content exactly as it was hashed before seen replay existed."""
    return {"algorithm": d["algorithm"], "seq_len": d["seq_len"], "global_batch_size": d["global_batch_size"],
            "seed": d["seed"], "shuffle_blocks": d["shuffle_blocks"],
            "sources": [{k: s[k] for k in ("name", "dataset", "version", "weight", "n_tokens", "n_blocks", "holdout")}
                        for s in d["sources"]],
            "schedule": d["schedule"], "tokenizer_sha256": d["tokenizer_sha256"]}


def test_fresh_blend_fingerprint_is_unchanged(mix_store: str, parent: Parent) -> None:
    sched = [{"step": 0, "weights": {"new": 0.5, "replay": 0.5}}, {"step": 9, "weights": {"new": 0.9, "replay": 0.1}}]
    for s in (spec(mix_store, {"new": 0.95, "replay": 0.05}), spec(mix_store, {"new": 1, "replay": 1}, schedule=sched)):
        blend, _ = resolve(s)
        d = blend.to_json()
        assert ALGORITHM == "moe-cpt/mixer-v1"
        assert all("replay" not in e and "seen_by" not in e for e in d["sources"])
        assert d["fingerprint"] == blend.fingerprint == sha256_hex(dumps_canonical(old_content(d)))[:16]
    seen = cpt_blend(mix_store, parent)[0].to_json()
    assert seen["fingerprint"] != sha256_hex(dumps_canonical(old_content(seen)))[:16]  # the replay is hashed


# ---- (6) bad specs ---------------------------------------------------------------------------------

def parent_record(parent: Parent) -> dict:
    return json.loads((parent.dir / "run.json").read_text())


def _bad_parent(tmp: Path, parent: Parent, edit) -> Path:
    rec = parent_record(parent)
    edit(rec)
    return write_record(tmp / "bad", rec)


def _tamper_counts(rec: dict) -> None:
    rec["data"]["state"]["counts"][0] += 1


@pytest.mark.parametrize(
    ("old", "edit", "msg"),
    [
        ({"replay": "sen"}, None, "replay must be one of fresh, seen"),
        ({"replay": "seen", "seen_by": None}, None, "needs seen_by"),
        ({"replay": "fresh"}, None, "seen_by only apply with replay: seen"),
        ({"seen_step": -1}, None, "seen_step must be an integer >= 0"),
        ({"seen_step": True}, None, "seen_step must be an integer >= 0"),
        ({"seen_step": PARENT_STEPS + 1}, None, f"beyond the parent's last step {PARENT_STEPS}"),
        ({"seen_step": 0}, None, "consumed no samples"),
        ({"dataset": "new@latest"}, None, "never read new@"),
        ({"seq_len": 32}, None, "seq_len 32 differs from the parent's 64"),
        ({"holdout_tokens": 0}, None, "another held-out split"),
        ({}, "empty", "cannot read the parent's run.json"),
        ({}, lambda r: r.update(data={"kind": "synthetic"}), "did not read a mixer blend"),
        ({}, lambda r: r["data"]["blend"].update(seed=99), "recorded blend is unusable"),
        ({}, lambda r: r.pop("run_id"), "has no run_id"),
        ({}, lambda r: r.pop("end_step"), "has no end_step"),
        ({}, _tamper_counts, "recorded mixer state at step"),
    ],
)
def test_bad_seen_specs_fail_with_one_line(mix_store: str, parent: Parent, tmp_path: Path, old, edit, msg) -> None:
    where: Path = parent.dir
    if edit == "empty":
        where = tmp_path / "no-run"
        where.mkdir()
    elif edit is not None:
        where = _bad_parent(tmp_path, parent, edit)
    s = cpt_spec(mix_store, where)
    if "seq_len" in old:
        s["seq_len"] = old.pop("seq_len")
    s["sources"]["old"].update(old)
    s["sources"]["old"] = {k: v for k, v in s["sources"]["old"].items() if v is not None}
    with pytest.raises(ConfigError) as ei:
        resolve(s)
    text = str(ei.value)
    assert msg in text and "\n" not in text, text


def test_parent_reading_a_version_twice_or_replaying_itself_is_refused(mix_store: str, parent: Parent,
                                                                     tmp_path: Path) -> None:
    twice = spec(mix_store, {"replay": 1.0})
    twice["sources"]["again"] = {"dataset": "replay@latest", "weight": 1.0}
    blend, _ = resolve(twice)
    run = write_record(tmp_path / "twice", {"run_id": "r2", "data": {"kind": "mixer", "blend": blend.to_json()},
                                            "end_step": 5})
    with pytest.raises(ConfigError, match="as several sources"):
        resolve(cpt_spec(mix_store, run))
    chained = cpt_blend(mix_store, parent)[0]
    run = write_record(tmp_path / "chained", {"run_id": "r3", "data": {"kind": "mixer", "blend": chained.to_json()},
                                              "end_step": 5})
    with pytest.raises(ConfigError, match="itself a replay: seen source"):
        resolve(cpt_spec(mix_store, run))


# ---- (7) round trip, YAML/TOML, relative paths, inspect --------------------------------------------

def test_resolved_json_round_trips_the_mode(mix_store: str, parent: Parent) -> None:
    blend = cpt_blend(mix_store, parent, seen_step=20)[0]
    d = json.loads(json.dumps(blend.to_json()))
    entry = d["sources"][OLD]
    assert entry["seen_by"] == str(parent.dir)
    assert entry["replay"] == {"mode": "seen", "parent_run_id": "20261201T000000-parent01",
                               "parent_blend": parent.fingerprint, "parent_source": "replay", "seq_len": 64,
                               "seed": 7, "key": f"replay:{blend.sources[OLD].version}",
                               "shuffle_blocks": PARENT_SHUFFLE, "holdout": blend.sources[OLD].holdout.to_json(),
                               "seen_step": 20, "n_seen": sum(parent.consumed(20).values())}
    again = blend_from_json(d)
    assert again == blend and again.to_json() == blend.to_json() and again.fingerprint == blend.fingerprint
    assert (again.spec.sources[OLD].replay, again.spec.sources[OLD].seen_step) == ("seen", 20)
    assert again.sources[0].replay is None
    d["sources"][OLD]["replay"]["n_seen"] += 1
    with pytest.raises(ConfigError, match="modified"):
        blend_from_json(d)
    # the resolved JSON resolves again to the same blend (the pinned replay record is accepted)
    assert resolve(blend.to_json())[0].fingerprint == blend.fingerprint


def test_yaml_and_toml_specs_with_relative_seen_by(mix_store: str, parent: Parent, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(parent.dir.parent)
    rel = parent.dir.name
    (tmp_path / "cpt.yaml").write_text(
        f"store: {mix_store}\nseq_len: 64\nglobal_batch_size: 24\nseed: 7\nsources:\n"
        f"  new: {{dataset: new@latest, weight: 0.7}}\n"
        f"  old: {{dataset: replay@latest, weight: 0.3, replay: seen, seen_by: {rel}}}\n")
    (tmp_path / "cpt.toml").write_text(
        f'store = "{mix_store}"\nseq_len = 64\nglobal_batch_size = 24\nseed = 7\n'
        f'[sources.new]\ndataset = "new@latest"\nweight = 0.7\n'
        f'[sources.old]\ndataset = "replay@latest"\nweight = 0.3\nreplay = "seen"\nseen_by = "{rel}"\n')
    want = cpt_blend(mix_store, parent)[0]
    for f in ("cpt.yaml", "cpt.toml"):
        blend, _ = resolve(tmp_path / f)
        assert blend.fingerprint == want.fingerprint and blend.sources[OLD].replay.seen_by == str(parent.dir)
    assert main(["mix", "inspect", str(tmp_path / "cpt.yaml"), "--steps", "100"]) == 0
    out = capsys.readouterr().out
    n_seen = want.sources[OLD].replay.n_seen
    row = next(line for line in out.splitlines() if line.strip().startswith("old "))
    count = advance(MixPoint.start(2), want.spec.weight_schedule(), 24, 100).counts[OLD]
    assert row.split()[1:] == [want.sources[OLD].spec, "0.3000", str(count), str(count * 64),
                               f"{count / n_seen:.3f}", "seen"]
    assert "replay: seen" in out and "20261201T000000-parent01" in out
    assert next(line for line in out.splitlines() if line.strip().startswith("new ")).split()[-1] == "fresh"


# ---- the service serves the same replay ----------------------------------------------------------

def test_service_serves_the_same_seen_replay(mix_store: str, parent: Parent) -> None:
    blend, dss = cpt_blend(mix_store, parent)
    fast = ClientConfig(retry_s=60.0, backoff_s=0.05, max_backoff_s=0.5)
    with MixService(blend, dss, ServiceConfig(port=0), CacheConfig(prefetch_threads=2)) as svc:
        ds = ServiceMixedDataset(svc.url, 1, 2, spec=cpt_spec(mix_store, parent.dir), config=fast)
        it = iter(ds)
        got = [next(it) for _ in range(300)]
        ms = cpt_stream(mix_store, parent, 1, 2)
        want, state = take(ms, 300)
        ms.close()
        assert [key(s) for s in got] == [key(s) for s in want]
        assert ds.state_dict() == state.to_dict()
        n_seen = blend.sources[OLD].replay.n_seen
        assert ds.epochs()["old"] == pytest.approx(state.point.counts[OLD] / n_seen)
        fresh = cpt_spec(mix_store, parent.dir)
        for k in ("replay", "seen_by"):
            del fresh["sources"]["old"][k]
        with pytest.raises(ConfigError, match="replay fresh != seen"):
            ServiceMixedDataset(svc.url, 0, 1, spec=fresh, config=fast)
