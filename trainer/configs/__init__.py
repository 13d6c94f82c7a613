"""Example trainer configs shipped inside the package: ``cpt train --example NAME``.

Only the self-contained ones are examples: synthetic data, 2 gloo processes on CPU, a few
steps, so they run right after ``pip install 'moe-cpt[train]'`` with no store and no checkout.
The other files here (mixer-fed, study, paper scale) name blends by paths relative to the
repository root and are run from a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moe_cpt.errors import ConfigError

EXAMPLES: tuple[str, ...] = ("tiny_moe", "tiny_dense", "tiny_switch", "tiny_granular")


def example_config(name: str) -> Path:
    """The installed file of example ``name`` (one of :data:`EXAMPLES`)."""
    if name not in EXAMPLES:
        raise ConfigError(f"no example config {name!r}; choose from {', '.join(EXAMPLES)}")
    path = Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError(f"example config {name!r} is missing from the installed package ({path})")
    return path
