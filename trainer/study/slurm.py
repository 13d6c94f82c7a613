"""``cpt study STUDY.yaml --emit slurm DIR``: one sbatch file per run, submitted in dependency
order by ``DIR/submit.sh`` (each CPT job ``--dependency=afterok:<its pre-training job>``), plus
a last CPU job that builds the report once every run succeeded.

Each job is one node running ``cpt train CONFIG`` (a ``torchrun --standalone`` of the run's
``parallel.nproc`` processes); ``--signal=USR1@300`` lets the trainer checkpoint and requeue
before the time limit (trainer/signals.py), and a requeued job resumes from its checkpoint.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from moe_cpt.trainer.study.runner import Study


@dataclass(frozen=True)
class SlurmOptions:
    time: str = "48:00:00"
    cpus_per_gpu: int = 8
    partition: str = ""
    account: str = ""


def job_name(study: Study, key: str) -> str:
    return f"{study.spec.name}.{key.replace('/', '.')}"


def sbatch_text(study: Study, key: str, opts: SlurmOptions, workdir: Path) -> str:
    p = study.plan(key)
    nproc = int(p.config["parallel"]["nproc"])
    lines = ["#!/bin/bash",
             f"# study {study.spec.name}, run {p.name} ({p.kind}, {p.steps} steps)"
             + (f"; starts from {p.parent}" if p.parent else ""),
             f"#SBATCH --job-name={job_name(study, key)}",
             "#SBATCH --nodes=1",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={nproc}",
             f"#SBATCH --cpus-per-task={opts.cpus_per_gpu * nproc}",
             f"#SBATCH --time={opts.time}",
             f"#SBATCH --output={p.output_dir}.slurm-%j.log",
             "#SBATCH --signal=USR1@300",
             "#SBATCH --requeue"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    lines += ["set -euo pipefail",
              f"cd {shlex.quote(str(workdir))}",
              f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{opts.cpus_per_gpu}}}",
              f"exec \"${{VENV:-$PWD/.venv}}/bin/cpt\" train {shlex.quote(p.config_path)}", ""]
    return "\n".join(lines)


def report_sbatch(study: Study, opts: SlurmOptions, workdir: Path) -> str:
    return "\n".join([
        "#!/bin/bash", f"# study {study.spec.name}: the report, after every run succeeded",
        f"#SBATCH --job-name={study.spec.name}.report", "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2", "#SBATCH --time=01:00:00",
        f"#SBATCH --output={study.root}/report.slurm-%j.log", "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        f"exec \"${{VENV:-$PWD/.venv}}/bin/cpt\" study report {shlex.quote(str(study.root))}", ""])


def emit(study: Study, folder: str | Path, opts: SlurmOptions | None = None,
         workdir: str | Path | None = None) -> Path:
    """Write ``<folder>/NNN-<run>.sbatch``, ``report.sbatch``, ``submit.sh`` and ``jobs.json``;
    returns the path of ``submit.sh``."""
    opts = opts or SlurmOptions()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(workdir or Path.cwd()).absolute()
    index = {p.key: i for i, p in enumerate(study.plans)}
    files, jobs = {}, []
    for p in study.plans:
        if p.parent and index[p.parent] > index[p.key]:
            raise AssertionError(f"run {p.key} listed before its parent {p.parent}")
        name = f"{index[p.key]:03d}-{p.key.replace('/', '__')}.sbatch"
        (out / name).write_text(sbatch_text(study, p.key, opts, work))
        files[p.key] = name
        jobs.append({"run": p.name, "key": p.key, "sbatch": name, "after": list(p.depends_on),
                     "config": p.config_path, "run_dir": p.output_dir})
    (out / "report.sbatch").write_text(report_sbatch(study, opts, work))
    submit = ["#!/bin/bash",
              f"# Submit study {study.spec.name}: {len(study.plans)} runs in dependency order, "
              "then the report.",
              "set -euo pipefail", 'cd "$(dirname "$0")"', "all=()"]
    for p in study.plans:
        var = f"j{index[p.key]}"
        dep = ("--dependency=afterok:" + ":".join(f"${{j{index[d]}}}" for d in p.depends_on) + " ") \
            if p.depends_on else ""
        submit += [f"{var}=$(sbatch --parsable {dep}{files[p.key]})",
                   f"all+=(\"${var}\")", f"echo \"{p.name}: job ${var}\""]
    submit += ["report=$(sbatch --parsable --dependency=afterok:$(IFS=:; echo \"${all[*]}\") "
               "report.sbatch)", "echo \"report: job $report\"", ""]
    path = out / "submit.sh"
    path.write_text("\n".join(submit))
    path.chmod(0o755)
    (out / "jobs.json").write_text(json.dumps({"study": study.spec.name, "jobs": jobs}, indent=1))
    return path
