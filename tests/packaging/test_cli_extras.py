"""The installed ``cpt`` command without the optional extras: it loads, and a command that needs
a missing extra fails with one line naming it, before any work.

The base install is simulated in a child process: a ``sitecustomize`` marks the extras' modules
as absent (``sys.modules[name] = None``, which both ``import`` and ``importlib.util.find_spec``
honour) and the real ``cpt`` script of this environment runs. ``infra/smoke_install.sh`` checks
the same on a real base-only install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from moe_cpt.extras import EXTRA_OF_MODULE
from tests.packaging.declared import ROOT, groups, normalize, requirement_name

CPT = Path(sys.executable).with_name("cpt")


def run_cpt(args: list[str], tmp_path: Path, absent: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in absent))
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(site)}
    return subprocess.run([str(CPT), *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=300)


BASE_ONLY = tuple(EXTRA_OF_MODULE)  # every module an extra brings is absent


def test_cli_loads_and_lists_every_command_without_the_extras(tmp_path: Path) -> None:
    r = run_cpt(["--help"], tmp_path, BASE_ONLY)
    assert r.returncode == 0, r.stderr
    for command in ("corpus", "mix", "train", "study", "runs", "bench"):
        assert f"    {command} " in r.stdout, command
    assert run_cpt(["train", "--help"], tmp_path, BASE_ONLY).returncode == 0


@pytest.mark.parametrize("args,command,extra", [
    (["train", "--example", "tiny_moe"], "cpt train", "train"),
    (["study", "x.yaml", "--dry-run"], "cpt study", "train"),
    (["bench", "mixer", "--tokens", "1000"], "cpt bench mixer", "train"),
    (["mix", "serve", "blend.yaml"], "cpt mix serve", "train"),
    (["runs", "compare", "a", "b"], "cpt runs compare", "train"),
])
def test_a_command_of_a_missing_extra_is_one_line_naming_it(
        args: list[str], command: str, extra: str, tmp_path: Path) -> None:
    r = run_cpt(args, tmp_path, BASE_ONLY)
    assert r.returncode == 2
    assert r.stderr == f"cpt: error: '{command}' needs the {extra} extra: pip install 'moe-cpt[{extra}]'\n"
    assert r.stdout == "" and list(tmp_path.iterdir()) == [tmp_path / "site"]  # no work done


def test_an_s3_store_without_the_s3_extra_names_it(tmp_path: Path) -> None:
    r = run_cpt(["corpus", "ls", "--store", "s3://bucket/store"], tmp_path, ("s3fs",))
    assert r.returncode == 2
    assert r.stderr == ("cpt: error: cannot open 's3://bucket/store': it needs the s3 extra: "
                        "pip install 'moe-cpt[s3]'\n")


def test_the_ray_executor_without_ray_is_one_line(tmp_path: Path) -> None:
    r = run_cpt(["corpus", "build", "web.yaml", "--executor", "ray"], tmp_path, ("ray",))
    assert r.returncode == 2
    assert r.stderr == ("cpt: error: 'cpt corpus build --executor ray' needs the ray extra: "
                        "pip install 'moe-cpt[ray]'\n")


def test_the_slurm_executor_without_sbatch_is_one_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with python but without sbatch
    bin_dir.mkdir()
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent)])
    assert shutil.which("sbatch", path=path) is None
    r = run_cpt(["corpus", "build", "web.yaml", "--executor", "slurm"], tmp_path, env={"PATH": path})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "`sbatch`, which is not on PATH" in r.stderr
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")  # present: the check lets the build start
    (bin_dir / "sbatch").chmod(0o755)
    r = run_cpt(["corpus", "build", "web.yaml", "--executor", "slurm"], tmp_path, env={"PATH": path})
    assert "sbatch" not in r.stderr and "web.yaml" in r.stderr  # next failure: the missing config


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    r = run_cpt(["--version"], tmp_path, BASE_ONLY)
    assert r.returncode == 0
    assert r.stdout.startswith(f"cpt (moe-cpt) {metadata.version('moe-cpt')}")


def test_every_extra_module_belongs_to_an_extra_that_brings_it() -> None:
    """The table of :mod:`moe_cpt.extras` against pyproject.toml: each module's extra exists, and it
    declares the module's distribution or a distribution that requires it."""
    declared = groups()
    for module, extra in EXTRA_OF_MODULE.items():
        assert extra in declared and extra != "dev", (module, extra)
        dists = {normalize(d) for d in metadata.packages_distributions().get(module, [module])}
        if dists & set(declared[extra]):
            continue
        requirers = {normalize(d.metadata["Name"]) for d in metadata.distributions()
                     if any(requirement_name(q) in dists for q in d.requires or [] if "extra ==" not in q)}
        assert requirers & set(declared[extra]), f"{module}: the {extra} extra does not bring it"
    for extra in declared:
        if extra not in ("", "dev"):
            assert extra in EXTRA_OF_MODULE.values(), f"extra {extra} has no module in moe_cpt.extras"


def test_the_example_configs_are_self_contained() -> None:
    from moe_cpt.trainer.config import load_config
    from moe_cpt.trainer.configs import EXAMPLES, example_config

    for name in EXAMPLES:
        cfg = load_config(str(example_config(name)), [])
        assert cfg["data"]["kind"] == "synthetic", name  # runs without a store or a checkout


def test_the_wheel_carries_the_example_configs(tmp_path: Path) -> None:
    from moe_cpt.trainer.configs import EXAMPLES

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=600)
    (wheel,) = tmp_path.glob("moe_cpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in EXAMPLES:
        assert any(n.endswith(f"/configs/{name}.yaml") for n in names), name
