"""Which optional extra of the `moe-cpt` package brings a module, for the CLI's missing-extra errors.

The base install (`pip install moe-cpt`) builds and reads corpora; training, the study, S3 and
the Ray executor come with extras (`pip install "moe-cpt[s3,train]"`). A command that reaches a
module of an extra that is not installed gets one line naming the extra instead of a traceback.
"""

from __future__ import annotations

from cpt.errors import CptError

PACKAGE = "moe-cpt"

# top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "train",
    "torchtitan": "train",
    "torchdata": "train",
    "spmd_types": "train",
    "datasets": "train",
    "tensorboard": "train",
    "matplotlib": "train",
    "s3fs": "s3",
    "aiobotocore": "s3",
    "botocore": "s3",
    "ray": "ray",
}


class MissingExtraError(CptError):
    """A command needs a module from an optional extra that is not installed."""


def missing_extra(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The user-facing error for a missing module of one of our extras, or None if it is not one."""
    root = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return MissingExtraError(f"this command needs the {extra!r} extra (module {root!r} is not installed): "
                             f"pip install '{PACKAGE}[{extra}]'")
