"""Bad inputs, bad configs, object-store failures, concurrent builds, verify, and huge documents:
each fault ends in one clear line (or a correct version), never a silent partial publish."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zstandard

from moe_cpt.cli import main
from moe_cpt.corpus.build import build_dataset, compute_build_key, plan_inputs
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.corpus.lock import acquire_build_lock
from moe_cpt.corpus.tokenize_step import piece_bounds
from moe_cpt.errors import BusyError, InputDataError
from moe_cpt.infra.local_s3 import free_port
from moe_cpt.store import open_dataset
from moe_cpt.store.object_store import Store
from moe_cpt.store.tokenizer import read_tokenizer_bytes, tokenizer_info
from moe_cpt.store.verify import verify_version
from tests.corpus.helpers import read_back, write_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]
ONE = ExecutorConfig(workers=1)
DEADLINE_S = 600


def _records(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "text": f"document number {i} with a little text to tokenize " * 3}
            for i in range(start, start + n)]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_cpt.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=DEADLINE_S)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("cpt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---- 2. truncated / corrupt compressed inputs ---------------------------------------------------

def _zst_frames(records: list[dict], per_frame: int) -> bytes:
    c = zstandard.ZstdCompressor()
    out = b""
    for i in range(0, len(records), per_frame):
        out += c.compress("".join(json.dumps(r) + "\n" for r in records[i:i + per_frame]).encode())
    return out


def _cut_inside_frame(data: bytes, frames: list[bytes], frame: int) -> bytes:
    start = sum(len(f) for f in frames[:frame])
    return data[: start + len(frames[frame]) // 2]


@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("case", ["zst-multi-frame", "zst-single-frame", "gz-truncated", "gz-not-gzip", "zst-garbage"])
def test_truncated_or_corrupt_compressed_input_is_an_error_naming_the_file(
        case: str, policy: str, tmp_path: Path, tokenizer_path: Path) -> None:
    records = _records(200)
    folder = tmp_path / "in"
    folder.mkdir()
    if case.startswith("zst"):
        frames = [_zst_frames(records[i:i + 100], 100) for i in (0, 100)]
        if case == "zst-multi-frame":
            data = _cut_inside_frame(b"".join(frames), frames, 1)  # frame 1 of 2 cut in half
        elif case == "zst-single-frame":
            whole = _zst_frames(records, 200)
            data = whole[: len(whole) // 2]
        else:
            data = b"this is not zstd at all\n" * 10
        path = folder / "a.jsonl.zst"
    else:
        whole = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
        data = whole[: len(whole) // 2] if case == "gz-truncated" else b'{"id": 1, "text": "plain"}\n'
        path = folder / "a.jsonl.gz"
    path.write_bytes(data)
    write_jsonl(folder / "b.jsonl", _records(5, 1000))  # a good file next to it
    cfg = load_config(write_config(tmp_path / "c.yaml", name="z", inputs=["in"], tokenizer=str(tokenizer_path),
                                   on_bad_record=policy, tasks=1))
    with pytest.raises(InputDataError) as err:
        build_dataset(cfg, str(tmp_path / "store"), ONE)
    assert str(path) in str(err.value)
    assert "truncated" in str(err.value) or "not a valid" in str(err.value)
    assert Store(str(tmp_path / "store")).list_datasets() == []


def test_multi_frame_zst_cut_at_a_frame_boundary_is_just_fewer_frames(tmp_path: Path, tokenizer_path: Path) -> None:
    """A cut exactly between two frames leaves a valid zstd stream: the documented limit of what a
    reader can detect (such a file has no end marker beyond its frames)."""
    records = _records(200)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(_zst_frames(records, 100))
    cfg = load_config(write_config(tmp_path / "c.yaml", name="z", inputs=["in"], tokenizer=str(tokenizer_path), tasks=1))
    assert build_dataset(cfg, str(tmp_path / "store"), ONE).manifest.n_docs == 200


# ---- 3. empty inputs -----------------------------------------------------------------------------

def test_empty_input_is_refused_unless_allowed(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"")
    store = str(tmp_path / "store")
    cfg_path = write_config(tmp_path / "c.yaml", name="e", inputs=["in"], tokenizer=str(tokenizer_path))
    res = _cli("corpus", "build", str(cfg_path), "--store", store, "--workers", "1")
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert "0 documents" in line and "allow_empty" in line
    assert not (tmp_path / "store" / "e").exists() or Store(store).list_versions("e") == []

    allowed = load_config(write_config(tmp_path / "c2.yaml", name="e", inputs=["in"], tokenizer=str(tokenizer_path),
                                       allow_empty=True))
    result = build_dataset(allowed, store, ONE)
    assert result.manifest.n_docs == 0 and Store(store).resolve("e@latest") == ("e", result.version)
    # allow_empty is a policy, not part of the data: same config otherwise, same build key
    assert allowed.identity() == load_config(cfg_path).identity()


def test_everything_filtered_out_is_refused(tmp_path: Path, tokenizer_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "x", "text": "short"}])
    cfg = load_config(write_config(tmp_path / "c.yaml", name="f", inputs=["in"], tokenizer=str(tokenizer_path),
                                   clean={"min_chars": 1000}))
    with pytest.raises(InputDataError, match="0 documents .*1 document\\(s\\) read"):
        build_dataset(cfg, str(tmp_path / "store"), ONE)


# ---- 13. config value types ----------------------------------------------------------------------

BAD_CONFIGS = {
    "tasks-string": ({"tasks": "4"}, "tasks must be an integer, got str '4'"),
    "tasks-float": ({"tasks": 2.5}, "tasks must be an integer, got float 2.5"),
    "tasks-bool": ({"tasks": True}, "tasks must be an integer"),
    "inputs-int": ({"inputs": 5}, "inputs must be a URL, a mapping or a list"),
    "min-chars-null": ({"clean": {"min_chars": None}}, "min_chars must be an integer, got NoneType"),
    "num-buckets-0": ({"dedup": {"minhash": {"num_buckets": 0}}}, "num_buckets must be an integer >= 1"),
    "block-tokens-str": ({"packing": {"block_tokens": "1M"}}, "block_tokens must be an integer"),
    "name-int": ({"name": 123}, "name must be a string"),
    "exact-str": ({"dedup": {"exact": "yes"}}, "exact must be true or false"),
    "allow-empty-str": ({"allow_empty": "no"}, "allow_empty must be true or false"),
    "input-url-int": ({"inputs": [{"url": 3}]}, "url must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_value_types_are_named(case: str, tmp_path: Path, tokenizer_path: Path, capsys) -> None:
    fields, message = BAD_CONFIGS[case]
    cfg = write_config(tmp_path / "c.yaml", **{"name": "x", "inputs": ["in"], "tokenizer": str(tokenizer_path), **fields})
    assert main(["corpus", "build", str(cfg), "--store", str(tmp_path / "s")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line


def test_top_level_list_config_is_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump([{"name": "x"}]))
    assert main(["corpus", "build", str(tmp_path / "c.yaml"), "--store", str(tmp_path / "s")]) == 2
    assert "expected a mapping of keys at top level, got list" in _one_error_line(capsys.readouterr().err)


# ---- 5. verify every file; a damaged manifest does not break ls ---------------------------------

@pytest.fixture
def built(tmp_path: Path, tokenizer_path: Path) -> tuple[str, str]:
    write_jsonl(tmp_path / "in" / "a.jsonl", _records(40))
    cfg = load_config(write_config(tmp_path / "c.yaml", name="v", inputs=["in"], tokenizer=str(tokenizer_path)))
    store = str(tmp_path / "store")
    return store, build_dataset(cfg, store, ONE).version


@pytest.mark.parametrize("damage", ["index-deleted", "index-modified", "tokenizer-deleted", "tokenizer-modified"])
def test_verify_checks_index_and_tokenizer(damage: str, built: tuple[str, str], capsys) -> None:
    store, version = built
    ds = open_dataset(store, "v@latest")
    assert verify_version(ds).ok
    if damage.startswith("index"):
        target = Path(ds.store.version_path("v", version, ds.manifest.index_files[0]))
    else:
        target = Path(ds.store.path(ds.manifest.tokenizer.store_path))
    if damage.endswith("deleted"):
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x20
        target.write_bytes(bytes(data))
    assert main(["corpus", "verify", "v@latest", "--store", store]) == 1
    err = capsys.readouterr().err
    kind = "index" if damage.startswith("index") else "tokenizer"
    assert f"CORRUPT: {kind}" in err and ("missing" in err if damage.endswith("deleted") else "mismatch" in err)


def test_damaged_manifest_is_listed_not_fatal(built: tuple[str, str], tmp_path: Path, tokenizer_path: Path,
                                              capsys) -> None:
    store, version = built
    write_jsonl(tmp_path / "in2" / "a.jsonl", _records(10, 500))
    other = load_config(write_config(tmp_path / "c2.yaml", name="w", inputs=["in2"], tokenizer=str(tokenizer_path)))
    build_dataset(other, store, ONE)
    manifest = Path(store) / "v" / version / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # torn
    assert main(["corpus", "ls", "--store", store]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "w" in out and version in out


# ---- 14. object store problems ---------------------------------------------------------------------

def test_ls_with_the_endpoint_down_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    res = subprocess.run([sys.executable, "-m", "moe_cpt.cli", "corpus", "ls", "--store", "s3://some-bucket/store"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert res.returncode == 2
    assert "cannot reach the object store" in _one_error_line(res.stderr)


def test_no_credentials_is_one_line(s3_server, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true"})
    res = subprocess.run([sys.executable, "-m", "moe_cpt.cli", "corpus", "ls", "--store", "s3://some-bucket/store"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert res.returncode == 2
    assert "no credentials" in _one_error_line(res.stderr)


def test_missing_bucket_ls_says_so_and_build_needs_create_bucket(s3_server, tmp_path: Path, tokenizer_path: Path,
                                                                 capsys) -> None:
    import uuid

    import s3fs

    bucket = f"missing-{uuid.uuid4().hex[:10]}"
    assert main(["corpus", "ls", "--store", f"s3://{bucket}/store"]) == 2
    assert f"bucket '{bucket}'" in _one_error_line(capsys.readouterr().err)
    write_jsonl(tmp_path / "in" / "a.jsonl", _records(10))
    cfg = write_config(tmp_path / "c.yaml", name="b", inputs=["in"], tokenizer=str(tokenizer_path))
    assert main(["corpus", "build", str(cfg), "--store", f"s3://{bucket}/store", "--workers", "1"]) == 2
    assert "--create-bucket" in _one_error_line(capsys.readouterr().err)
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(bucket)
    assert main(["corpus", "build", str(cfg), "--store", f"s3://{bucket}/store", "--workers", "1",
                 "--create-bucket"]) == 0
    assert Store(f"s3://{bucket}/store").list_datasets() == ["b"]


# ---- 4. two identical builds -----------------------------------------------------------------------

def _lock_target(kind: str, tmp_path: Path, tokenizer_path: Path,
                 request: pytest.FixtureRequest) -> tuple[str, Path, Store, str]:
    """A 30-document build config on a local or S3 store: ``(store, config, Store, work dir)``
    (the work dir is what the build lock guards)."""
    store = str(tmp_path / "store") if kind == "local" else request.getfixturevalue("s3_bucket") + "/store"
    write_jsonl(tmp_path / "in" / "a.jsonl", _records(30))
    cfg_path = write_config(tmp_path / "c.yaml", name="l", inputs=["in"], tokenizer=str(tokenizer_path))
    cfg = load_config(cfg_path)
    tok = read_tokenizer_bytes(cfg.tokenizer)
    key = compute_build_key(cfg, tokenizer_info(tok, cfg.tokenizer, cfg.eos_token), plan_inputs(cfg))
    s = Store(store)
    return store, cfg_path, s, s.work_path(cfg.name, key)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_second_identical_build_refuses_naming_the_first(kind: str, tmp_path: Path, tokenizer_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    store, cfg_path, s, work = _lock_target(kind, tmp_path, tokenizer_path, request)
    with acquire_build_lock(s.fs, work, "a test build"):
        res = _cli("corpus", "build", str(cfg_path), "--store", store, "--workers", "1")
        assert res.returncode == 2
        line = _one_error_line(res.stderr)
        assert "in progress" in line and f"pid {os.getpid()}" in line and os.uname().nodename in line
        with pytest.raises(BusyError):
            acquire_build_lock(s.fs, work, "a test build")
    assert build_dataset(load_config(cfg_path), store, ONE).manifest.n_docs == 30  # released


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_dead_builders_lock_does_not_block(kind: str, tmp_path: Path, tokenizer_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    store, cfg_path, s, work = _lock_target(kind, tmp_path, tokenizer_path, request)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    url = work if kind == "local" else f"s3://{work}"
    holder = subprocess.Popen([sys.executable, "-m", "tests.corpus.race_worker", "lock", url, str(barrier)],
                              cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + DEADLINE_S
    while not (barrier / "locked").exists() and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (barrier / "locked").exists()
    with pytest.raises(BusyError, match=f"pid {holder.pid}"):
        build_dataset(load_config(cfg_path), store, ONE)
    os.killpg(holder.pid, signal.SIGKILL)  # the holder dies without releasing
    holder.wait()
    assert build_dataset(load_config(cfg_path), store, ONE).manifest.n_docs == 30


def test_two_identical_builds_at_once_do_not_break_each_other(tmp_path: Path, texts: list[str],
                                                              tokenizer_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)] * 1)
    write_jsonl(tmp_path / "in" / "b.jsonl", _records(300))
    cfg_path = write_config(tmp_path / "c.yaml", name="twin", inputs=["in"], tokenizer=str(tokenizer_path),
                            dedup={"exact": True, "minhash": {"enabled": True}})
    store = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "moe_cpt.cli", "corpus", "build", str(cfg_path), "--store", store, "--workers", "1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=DEADLINE_S), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc in (0, 2), err[-3000:]
        if rc == 2:
            assert "in progress" in _one_error_line(err)
    assert any(rc == 0 for rc, _ in results)
    s = Store(store)
    assert len(s.list_versions("twin")) == 1
    assert verify_version(open_dataset(store, "twin@latest")).ok


# ---- 16. a huge document ------------------------------------------------------------------------------

def test_piece_bounds_cut_before_a_space_and_tokens_do_not_change(tokenizer_path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer

    text = " ".join(texts) * 3
    bounds = piece_bounds(text, limit=5000, window=200)
    assert bounds[0] == 0 and bounds[-1] == len(text) and len(bounds) > 10
    assert all(b - a <= 5000 for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert all(text[b].isspace() and not text[b + 1].isspace() for b in bounds[1:-1])
    tok = Tokenizer.from_str(tokenizer_path.read_text())
    whole = tok.encode(text, add_special_tokens=False).ids
    pieces = [i for a, b in zip(bounds[:-1], bounds[1:], strict=True)
              for i in tok.encode(text[a:b], add_special_tokens=False).ids]
    assert pieces == whole
    assert piece_bounds("x" * 12000, limit=5000, window=200) == [0, 5000, 10000, 12000]  # no space: hard cuts


def test_a_document_longer_than_a_block_spans_blocks_and_reads_back(tmp_path: Path, tokenizer_path: Path,
                                                                    texts: list[str]) -> None:
    from tokenizers import Tokenizer

    base = " ".join(texts) + " "
    long_text = (base * (1_300_000 // len(base) + 1))[:1_300_000]  # over LONG_DOC_CHARS: tokenized in pieces
    records = [{"id": "short0", "text": texts[0]}, {"id": "long", "text": long_text}, {"id": "short1", "text": texts[1]}]
    write_jsonl(tmp_path / "in" / "a.jsonl", records)
    cfg = load_config(write_config(tmp_path / "c.yaml", name="h", inputs=["in"], tokenizer=str(tokenizer_path),
                                   tasks=1, clean={"unicode_normalization": None},
                                   packing={"block_tokens": 4096, "shard_bytes": 1 << 20}))
    result = build_dataset(cfg, str(tmp_path / "store"), ONE)
    blocks = [b for s in result.manifest.shards for b in s.blocks]
    assert max(b.n_tokens for b in blocks) < 2 * 4096 and len(blocks) > 10
    assert result.manifest.n_docs == 3
    got = read_back(str(tmp_path / "store"), "h@latest")
    tok = Tokenizer.from_str(tokenizer_path.read_text())
    eos = result.manifest.tokenizer.eos_id
    for r in records:
        assert got[r["id"]].tolist() == tok.encode(r["text"], add_special_tokens=False).ids + [eos], r["id"]
    assert verify_version(open_dataset(str(tmp_path / "store"), "h@latest")).ok


MEASURE = """
import json, resource, subprocess, sys
r = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if r.returncode:
    sys.exit(r.stderr[-3000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""
HUGE_DOC_MB = (4, 40)
PEAK_SPREAD_MB = 40  # peak RSS may grow by less than this from the small to the 10x larger document


def _build_peak_rss_mb(tmp: Path, tokenizer_path: Path, words: np.ndarray, mb: int) -> float:
    """Peak RSS (MB) of a ``cpt corpus build`` subprocess of one ``mb`` MB JSONL document."""
    rng = np.random.default_rng(0)
    text = " ".join(words[rng.integers(0, len(words), size=mb * 1_000_000 // 8)])
    write_jsonl(tmp / "in" / "a.jsonl", [{"id": "huge", "text": text}])
    del text
    cfg = write_config(tmp / "c.yaml", name="huge", inputs=["in"], tokenizer=str(tokenizer_path), tasks=1,
                       dedup={"exact": True, "minhash": {"enabled": True}},
                       packing={"block_tokens": 4096, "shard_bytes": 1 << 24})
    build = [sys.executable, "-m", "moe_cpt.cli", "corpus", "build", str(cfg), "--store", str(tmp / "store"),
             "--workers", "1"]
    # a fresh parent whose only child is the build: RUSAGE_CHILDREN is then the build's peak alone
    res = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(build)], cwd=REPO, capture_output=True,
                         text=True, timeout=DEADLINE_S)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = open_dataset(str(tmp / "store"), "huge@latest")
    blocks = [b for s in ds.manifest.shards for b in s.blocks]
    assert max(b.n_tokens for b in blocks) == 4096 and ds.manifest.n_docs == 1
    return float(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_huge_document_is_cut_into_blocks_with_bounded_memory(tmp_path: Path, tokenizer_path: Path,
                                                                texts: list[str]) -> None:
    words = np.array(sorted({w for t in texts for w in t.split()}))
    small, large = (_build_peak_rss_mb(tmp_path / str(mb), tokenizer_path, words, mb) for mb in HUGE_DOC_MB)
    print(f"\npeak RSS of the build of one {HUGE_DOC_MB[0]} MB document: {small:.0f} MB, "
          f"of one {HUGE_DOC_MB[1]} MB document: {large:.0f} MB")
    assert large - small < PEAK_SPREAD_MB, f"peak RSS {small:.0f} MB -> {large:.0f} MB"
