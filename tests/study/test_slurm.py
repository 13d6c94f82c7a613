"""`cpt study --emit slurm DIR`: one sbatch file per run of the study-scale study file, and a
submit script that chains every CPT job after its pre-training job (afterok), the report last."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from moe_cpt.cli import main

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "trainer" / "configs" / "study" / "paper.yaml"


def _emit(tmp_path: Path) -> Path:
    study = yaml.safe_load(PAPER.read_text())
    study["output_dir"] = str(tmp_path / "study")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["study", str(path), "--emit", "slurm", str(tmp_path / "slurm"), "--offline"]) == 0
    return tmp_path / "slurm"


def test_emit_slurm_chains_cpt_after_pretraining(tmp_path: Path) -> None:
    out = _emit(tmp_path)
    sbatch = sorted(p.name for p in out.glob("[0-9]*.sbatch"))
    # dense + 2 MoE x 2 routers = 5 variants, each: pretrain, 2 CPT, 2 re-train
    assert len(sbatch) == 25 and (out / "report.sbatch").exists()
    lines = (out / "submit.sh").read_text().splitlines()
    jobs = {}  # var -> (file, deps)
    for line in lines:
        m = re.match(r"^(j\d+)=\$\(sbatch --parsable (?:--dependency=afterok:(\S+) )?(\S+)\)$", line)
        if m:
            deps = re.findall(r"\$\{(j\d+)\}", m[2] or "")
            assert all(d in jobs for d in deps), f"{m[1]} depends on a job submitted later"
            jobs[m[1]] = (m[3], deps)
    assert len(jobs) == 25
    for _var, (name, deps) in jobs.items():
        text = (out / name).read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH --gpus-per-node=8" in text
        assert "#SBATCH --signal=USR1@300" in text and "#SBATCH --requeue" in text
        config = re.search(r"bin/cpt\" train (\S+)", text)[1]
        cfg = yaml.safe_load(Path(config).read_text())
        if "__cpt-" in name:
            assert len(deps) == 1
            parent = jobs[deps[0]][0]
            assert "__pretrain" in parent and parent.split("__")[0][4:] == name.split("__")[0][4:]
            assert cfg["run"]["parent_run_dir"].endswith(parent.split("__")[0][4:] + "/pretrain")
            assert cfg["schedule"]["warmup_steps"] == 0 and cfg["schedule"]["anneal_steps"] > 0
        else:
            assert deps == []
        flavor = cfg["model"]["flavor"]
        assert flavor in ("dense_500m", "switch_2b_a500m", "granular_2b_a500m")
        assert cfg["parallel"]["ep"] == {"dense_500m": 1, "switch_2b_a500m": 8, "granular_2b_a500m": 1}[flavor]
    report = [ln for ln in lines if "report.sbatch" in ln][0]
    assert report.count("afterok") == 1 and "${all[*]}" in report
    assert "cpt\" study report" in (out / "report.sbatch").read_text()


def test_submit_script_runs_against_a_fake_sbatch(tmp_path: Path) -> None:
    """Run submit.sh with an sbatch stub that logs its arguments and prints job ids."""
    out = _emit(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    stub = bin_dir / "sbatch"
    stub.write_text(f"#!/bin/bash\nn=$(wc -l < {log} 2>/dev/null || echo 0)\necho \"$@\" >> {log}\n"
                    "echo $((1000 + n))\n")
    stub.chmod(0o755)
    import os
    import subprocess

    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = subprocess.run([shutil.which("bash"), str(out / "submit.sh")], env=env, capture_output=True,
                         text=True, check=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 26 and "paper/dense/cpt-r0: job 1001" in res.stdout
    assert calls[1] == "--parsable --dependency=afterok:1000 001-dense__cpt-r0.sbatch"
    assert calls[-1].startswith("--parsable --dependency=afterok:1000:1001:") and calls[-1].endswith("report.sbatch")
