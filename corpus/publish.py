"""Atomic publish of a dataset version.

Shards and index files are first written to the build's work folder. Publishing moves them into
``<store>/<dataset>/<version>/``, stores the tokenizer, and writes ``manifest.json`` *last*: a
version is visible to readers only once its manifest exists, so a build that dies at any point
before leaves no readable half version, and rerunning the publish finishes the job (every step is
idempotent).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from moe_cpt.codeversion import code_version
from moe_cpt.corpus.shard_writer import PackingConfig, ShardSetWriter
from moe_cpt.errors import IntegrityError
from moe_cpt.fs import join, write_bytes_atomic
from moe_cpt.hashing import fast_checksum, sha256_hex
from moe_cpt.store.manifest import Manifest, TokenizerInfo
from moe_cpt.store.object_store import Store, check_name


def publish_version(
    store: Store, manifest: Manifest, staging: str, build_key: str, tokenizer_json: bytes
) -> str:
    """Move staged files into place, write the manifest last, update refs. Returns the version."""
    fs = store.fs
    name = manifest.dataset
    version = manifest.version_id()
    if not store.has_version(name, version):
        dest = store.version_path(name, version)
        rels = [s.path for s in manifest.shards] + list(manifest.index_files)
        for rel in rels:
            src, dst = join(staging, rel), join(dest, rel)
            if fs.exists(src):
                fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                fs.mv(src, dst)
            elif not fs.exists(dst):
                raise IntegrityError(f"cannot publish {name}: staged file {rel} is missing from {staging}")
        tok_path = store.path(manifest.tokenizer.store_path)
        if not fs.exists(tok_path):
            write_bytes_atomic(fs, tok_path, tokenizer_json)
        manifest.build.setdefault("published_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_bytes_atomic(fs, store.version_path(name, version, "manifest.json"), manifest.to_json_bytes())
    store.register_version(name, version, build_key)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    return version


def publish_documents(
    store_url: str,
    name: str,
    documents: Iterable[tuple[str, np.ndarray]],
    tokenizer: TokenizerInfo,
    tokenizer_json: bytes,
    packing: PackingConfig = PackingConfig(),
    config: dict | None = None,
) -> str:
    """Publish already-tokenized documents ``(doc_id, token ids without EOS)`` as a version.

    The library path for data that was tokenized elsewhere (and for tests of later stages).
    Returns the version id.
    """
    store = Store(store_url)
    check_name(name)
    docs = list(documents)
    digest = fast_checksum(*(np.asarray(t).tobytes() for _, t in docs))
    build_key = sha256_hex(f"documents:{name}:{digest}:{tokenizer.sha256}:{packing}".encode())[:24]
    staging = store.work_path(name, build_key)
    writer = ShardSetWriter(store.fs, staging, "part-00000", tokenizer.np_dtype, packing)
    eos = np.array([tokenizer.eos_id], dtype=tokenizer.np_dtype)
    for doc_id, ids in docs:
        ids = np.asarray(ids, dtype=tokenizer.np_dtype)
        writer.add(np.concatenate([ids, eos]), doc_id, "memory", fast_checksum(ids.tobytes()))
    shards, index_rel = writer.close()
    manifest = Manifest(
        dataset=name,
        tokenizer=tokenizer,
        config=config or {"packing": packing.__dict__},
        inputs=[{"url": "memory", "docs": len(docs), "checksum": digest}],
        shards=shards,
        stats={"stages": [{"stage": "input", "docs_in": len(docs), "docs_out": len(docs)}]},
        index_files=[index_rel],
        index_meta=[writer.index_file.to_json()] if writer.index_file else None,
        build={"build_key": build_key, "code": code_version()},
    )
    return publish_version(store, manifest, staging, build_key, tokenizer_json)
