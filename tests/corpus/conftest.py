"""Fixtures for corpus tests: a small real BPE tokenizer and helpers to write inputs/configs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from moe_cpt.corpus.tokenizer import train_bpe


def sample_texts() -> list[str]:
    """Real English/code text already on the machine: docstrings of stdlib modules."""
    import argparse
    import email
    import json as j
    import logging
    import pathlib
    import textwrap

    texts = []
    for mod in (argparse, email, j, logging, pathlib, textwrap):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in texts:
                texts.append(doc)
    return texts


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return sample_texts()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_bytes(train_bpe(texts, 600))
    return path
