"""``cpt study``: the paper's experiment grid as one command (docs/study.md).

Modules: ``schema`` (study file), ``grid`` (every run's config and blend), ``runner`` (lanes,
resume, progress, the study record), ``slurm`` (sbatch files with afterok chains), ``curves``
(run log readers), ``results`` (every number), ``verdicts`` (the paper's claims), ``plots``,
``report`` (index.html, results.json, results.md), ``cli``.
"""
