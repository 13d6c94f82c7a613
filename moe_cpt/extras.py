"""Which optional extra of the ``moe-cpt`` package brings a module, for one-line CLI errors.

The base install (``pip install moe-cpt``) builds, reads and blends corpora on local disk;
training and the study (``train``), S3 stores (``s3``) and the Ray executor (``ray``) come with
extras. A command that reaches a module of an extra that is not installed gets one line naming
the command and the extra, e.g. ``cpt: error: 'cpt train' needs the train extra: pip install
'moe-cpt[train]'``, instead of a traceback. ``tests/packaging`` checks this table against the
extras declared in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.util

from moe_cpt.errors import CptError

DISTRIBUTION = "moe-cpt"

# top-level import name -> the extra of pyproject.toml that installs it (directly or as a
# dependency of what the extra declares)
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "train",
    "torchtitan": "train",
    "torchdata": "train",
    "datasets": "train",
    "tensorboard": "train",
    "matplotlib": "train",
    "s3fs": "s3",
    "aiobotocore": "s3",
    "botocore": "s3",
    "ray": "ray",
}


class MissingExtraError(CptError):
    """A command needs a module of an optional extra that is not installed."""


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_extra_error(command: str, extra: str) -> MissingExtraError:
    return MissingExtraError(f"'{command}' needs the {extra} extra: {install_hint(extra)}")


def missing_extra(exc: BaseException) -> str | None:
    """The extra whose module is missing behind ``exc`` (an ImportError, or an error raised from
    one, like fsspec's "Install s3fs to access S3"), or None if ``exc`` is no such case.

    Only a module that is really not installed counts: an ImportError inside an installed
    package (a broken install, a bad version) stays a traceback, since no extra would fix it."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError) and err.name:
            root = err.name.split(".")[0]
            extra = EXTRA_OF_MODULE.get(root)
            if extra is not None and importlib.util.find_spec(root) is None:
                return extra
        err = err.__cause__ or err.__context__
    return None


def require_module(module: str, command: str) -> None:
    """Raise :class:`MissingExtraError` now, before any work, if ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise missing_extra_error(command, EXTRA_OF_MODULE[module])
