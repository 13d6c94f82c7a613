"""The deployment files in infra/ are at least syntactically valid and agree with the code.

No cluster or Docker daemon here: compose is checked as YAML against what the services need
(and against the compose-spec schema, with the Dockerfile's lint, in tests/packaging),
the launch scripts with ``bash -n``, the executor option files by building datatrove's
executors through ``moe_cpt.corpus.build.make_executor``, and every ``cpt`` command the files run is
parsed by the real CLI parser.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moe_cpt.cli import build_parser
from moe_cpt.corpus.build import make_executor
from moe_cpt.corpus.config import ExecutorConfig
from moe_cpt.mixer.spec import load_spec

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_services_are_complete_and_loopback_only() -> None:
    doc = _compose()
    services = doc["services"]
    assert set(services) == {"minio", "minio-init", "mixer"}
    for name, svc in services.items():
        assert "image" in svc, name
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert set(services["mixer"]["secrets"]) <= set(doc["secrets"])
    assert all(v in doc["volumes"] for v in ("minio-data", "mixer-cache"))


def test_compose_mixer_command_parses_with_the_real_cli() -> None:
    # the image's entrypoint is `cpt` (infra/Dockerfile), so the command is cpt's arguments
    cpt = ["cpt", *_compose()["services"]["mixer"]["command"]]
    args = build_parser().parse_args(cpt[1:])
    assert args.command == "mix"
    assert "0.0.0.0" in cpt and "--token-file" in cpt  # bound beyond loopback => token


def test_compose_blend_is_a_valid_spec() -> None:
    spec = load_spec(INFRA / "blend.compose.yaml")
    assert [s.name for s in spec.sources] == ["code", "prose"]
    assert spec.sources[1].weight == pytest.approx(0.05)


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "torchrun/train.sh"])
def test_launch_scripts_are_valid_bash_running_the_trainer(script: str) -> None:
    path = INFRA / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "-m torch.distributed.run" in text and "-m moe_cpt.trainer" in text


@pytest.mark.parametrize("kind,options", [("slurm", "slurm/corpus_build.yaml"),
                                          ("ray", "ray/corpus_build.yaml")])
def test_executor_options_build_datatrove_executors(kind: str, options: str, tmp_path: Path) -> None:
    opts = yaml.safe_load((INFRA / options).read_text())
    stage = SimpleNamespace(name="tokenize", pipeline=[], tasks=4)
    plan = SimpleNamespace(logging_dir=lambda stage: str(tmp_path / stage), cfg=SimpleNamespace(name="web"))
    executor = make_executor(stage, plan, ExecutorConfig(kind=kind, options=opts))
    assert type(executor).__name__ == {"slurm": "SlurmPipelineExecutor", "ray": "RayPipelineExecutor"}[kind]
    assert executor.world_size == 4


def test_slurm_script_asks_for_the_pre_timeout_signal_that_the_trainer_handles() -> None:
    """SIGUSR1 before the time limit; torchrun must ignore it (the workers checkpoint and requeue:
    tests/trainer/test_process_lifetime.py sends the real signal to a real training)."""
    from moe_cpt.trainer.signals import PREEMPT_SIGNAL

    text = (INFRA / "slurm" / "train.sbatch").read_text()
    assert f"--signal={PREEMPT_SIGNAL.name.removeprefix('SIG')}@" in text and "#SBATCH --requeue" in text
    assert """trap "" USR1; exec "$@\"""" in text
