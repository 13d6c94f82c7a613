"""One-pass signatures and the exact-aware cluster step: invariances and index bookkeeping."""

from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np
from datatrove.data import Document

from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, MinhashSettings, load_config
from moe_cpt.corpus.minhash_cluster import components
from moe_cpt.corpus.minhash_sigs import DedupSignatures, OnePermutationMinhash, text_pieces
from tests.corpus.helpers import read_back, write_config, write_jsonl


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def _signature(oph: OnePermutationMinhash, text: str) -> np.ndarray:
    h, seg = oph.shingle_hashes([text])
    sig = oph.bin_minima(h, seg, 1)
    oph.densify(sig)
    return sig[0]


def test_bin_agreement_estimates_jaccard() -> None:
    rng = random.Random(1)
    oph = OnePermutationMinhash(MinhashSettings(num_buckets=32, hashes_per_bucket=8))
    for length, every in ((400, 10), (400, 40), (3000, 100)):
        a = _words(rng, length)
        b = [("zz" if i % every == 0 else w) for i, w in enumerate(a)]
        sa, sb = ({tuple(x[i : i + 5]) for i in range(len(x) - 4)} for x in (a, b))
        jaccard = len(sa & sb) / len(sa | sb)
        agree = float((_signature(oph, " ".join(a)) == _signature(oph, " ".join(b))).mean())
        assert abs(agree - jaccard) < 0.1, (length, every, agree, jaccard)


def test_normalization_case_punctuation_numbers() -> None:
    oph = OnePermutationMinhash(MinhashSettings())
    a = _signature(oph, "The quick, brown fox -- jumps over 3.14 lazy dogs; again and again")
    b = _signature(oph, "the QUICK brown fox jumps over 42 lazy dogs again and again")
    c = _signature(oph, "the quick brown cat jumps over 42 lazy dogs again and again")
    assert (a == b).all() and not (a == c).all()


def _sig_files(tmp: Path, docs: list[str], **kw) -> dict[str, bytes]:
    step = DedupSignatures(None, None, str(tmp), MinhashSettings(), **kw)
    step.run(iter(Document(text=t, id=str(i)) for i, t in enumerate(docs)), rank=0)
    return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(tmp.rglob("*.sig"))}


def test_signature_files_do_not_depend_on_batching(tmp_path: Path) -> None:
    rng = random.Random(2)
    docs = [" ".join(_words(rng, rng.randint(0, 400))) for _ in range(60)] + ["tiny doc", ""]
    one_batch = _sig_files(tmp_path / "a", docs)
    small_batches = _sig_files(tmp_path / "b", docs, batch_bytes=500)  # documents cut over batches
    assert one_batch == small_batches and len(one_batch) == 14
    n_records = len(one_batch["bucket_000/00000.minhash.sig"]) // (8 * 8 + 4)
    assert n_records == 60 - sum(len(d.split()) < 5 for d in docs[:60])  # < 5 words: no shingle


def test_long_documents_in_pieces_keep_their_signature(tmp_path: Path) -> None:
    rng = random.Random(3)
    text = " ".join(_words(rng, 20000))
    pieces = list(text_pieces(text, 4096))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 4096 and len(pieces) > 20
    whole = _sig_files(tmp_path / "a", [text])
    cut = _sig_files(tmp_path / "b", [text], piece_chars=4096)  # loses the shingles across cuts
    a = np.frombuffer(b"".join(whole.values()), dtype="<u4")
    b = np.frombuffer(b"".join(cut.values()), dtype="<u4")
    assert (a == b).mean() > 0.9


def test_components_are_connected_clusters() -> None:
    a = np.array([5, 7, 1, 20, 9], dtype=np.int64)
    b = np.array([7, 9, 3, 21, 30], dtype=np.int64)
    nodes, root = components(a, b)
    got = dict(zip(nodes.tolist(), root.tolist(), strict=True))
    assert got == {1: 1, 3: 1, 5: 5, 7: 5, 9: 5, 30: 5, 20: 20, 21: 20}


def test_exact_and_near_duplicates_across_tasks_same_version_for_any_workers(tmp_path: Path,
                                                                            tokenizer_path: Path) -> None:
    """Exact copies, near copies of those copies, and a near-dup chain spread over 3 tasks: the
    MinHash removals are translated into the stream after the exact filter, one document of each
    cluster survives, and 1 or 3 workers publish the same version id."""
    rng = random.Random(4)
    originals = [" ".join(_words(rng, 150)) for _ in range(12)]
    records = [{"id": f"o{i}", "text": t} for i, t in enumerate(originals)]
    near = lambda t, k: " ".join(w + ("x" if j == k else "") for j, w in enumerate(t.split()))  # noqa: E731
    dup = [{"id": "e0", "text": originals[0]}, {"id": "e1", "text": originals[1]},
           {"id": "n0", "text": near(originals[0], 140)}, {"id": "n0b", "text": near(originals[0], 140)},
           {"id": "n2", "text": near(originals[2], 3)}, {"id": "n2b", "text": near(near(originals[2], 3), 100)}]
    write_jsonl(tmp_path / "in" / "a.jsonl", dup[:3] + records[:4])
    write_jsonl(tmp_path / "in" / "b.jsonl", records[4:8] + dup[3:])
    write_jsonl(tmp_path / "in" / "c.jsonl", records[8:] + [{"id": d["id"] + "c", "text": d["text"]} for d in dup[:2]])
    cfg = load_config(write_config(tmp_path / "c.yaml", name="d", inputs=["in"], tasks=3, tokenizer=str(tokenizer_path),
                                   dedup={"exact": True, "minhash": {"enabled": True}}))
    versions = []
    for workers in (1, 3):
        store = str(tmp_path / f"store{workers}")
        result = build_dataset(cfg, store, ExecutorConfig(workers=workers))
        versions.append(result.version)
        kept = set(read_back(store, "d"))
        for group in ({"o0", "e0", "e0c", "n0", "n0b"}, {"o1", "e1", "e1c"}, {"o2", "n2", "n2b"}):
            assert len(kept & group) == 1, (group, kept)
        assert {f"o{i}" for i in range(3, 12)} <= kept and len(kept) == 12
        stages = {s["stage"]: s for s in result.manifest.stats["stages"]}
        assert stages["dedup: exact"]["dropped"] == 5  # 2 of o0/e0/e0c, 2 of o1/e1/e1c, 1 of n0/n0b
        assert stages["dedup: minhash"]["dropped"] == 3  # 1 of group 0, 2 of the o2 chain
    assert versions[0] == versions[1]


def test_numpy_buckets_write_datatrove_pairs(tmp_path: Path, texts: list[str]) -> None:
    """FastMinhashBuckets finds exactly the pairs of datatrove's MinhashDedupBuckets, also with
    tiny read blocks (the block merge) and two workers per bucket (hash ranges)."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets

    from moe_cpt.bench.planted_dups import PlantedSpec, make_planted
    from moe_cpt.corpus.config import DedupConfig
    from moe_cpt.corpus.dedup import minhash_config
    from moe_cpt.corpus.minhash_buckets import FastMinhashBuckets

    planted = make_planted(texts, PlantedSpec(originals=90, words=(30, 200), clusters_per_rate=10, copies=2))
    settings = MinhashSettings(num_buckets=4, hashes_per_bucket=3)
    cfg = minhash_config(DedupConfig(minhash=settings))
    sigs = tmp_path / "sigs"
    for task in range(3):
        docs = planted.records[task::3]
        DedupSignatures(None, None, str(sigs), settings).run(
            iter(Document(text=r["text"], id=r["id"]) for r in docs), rank=task)

    def pairs(step_cls, out: Path, world: int, **kw) -> np.ndarray:
        for rank in range(world):
            step_cls(str(sigs), str(out), config=cfg, **kw).run(rank=rank, world_size=world)
        rows = np.frombuffer(b"".join(p.read_bytes() for p in sorted(out.glob("*.dups"))), dtype="<u4")
        rows = rows.reshape(-1, 4)
        return rows[np.lexsort(rows.T[::-1])]

    theirs = pairs(MinhashDedupBuckets, tmp_path / "dt", 4)
    assert len(theirs) > 40
    for world, block in ((4, 1 << 16), (4, 3), (8, 2)):
        ours = pairs(FastMinhashBuckets, tmp_path / f"ours-{world}-{block}", world, block_records=block)
        assert np.array_equal(ours, theirs), (world, block)
