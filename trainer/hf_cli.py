"""``cpt checkpoint import-hf`` / ``export-hf``: Hugging Face checkpoints in and out
(trainer/hf_checkpoint.py; registered into the ``cpt`` command)."""

from __future__ import annotations

import argparse

# moe_cpt.trainer.hf_checkpoint (torch) is imported when a command runs, like trainer/cli.py does, so
# that `cpt` starts fast and works without the train extra.


def _import(args: argparse.Namespace) -> int:
    from moe_cpt.trainer.hf_checkpoint import import_hf

    result = import_hf(args.hf_dir, args.out_run_dir, name=args.name)
    print(f"imported {args.hf_dir} -> {result.run_dir} ({result.parameters:,} parameters)")
    print(f"tokenizer: {result.tokenizer}")
    print("continue it with a CPT config holding:\n"
          f"  model.flavor: {result.flavor}\n"
          f"  run.phase: cpt\n  run.parent_run_dir: {result.run_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moe_cpt.trainer.hf_checkpoint import export_hf

    result = export_hf(args.run, args.out_dir, trust=args.trust_checkpoint)
    print(f"exported step {result.step} -> {result.out_dir} ({result.architecture}, "
          f"{result.parameters:,} parameters, float32)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "checkpoint",
        help="Hugging Face checkpoints in and out (import-hf, export-hf)",
        description="Convert between Hugging Face Qwen3 / Qwen3-MoE model folders and this "
        "trainer's runs (see docs/trainer.md, 'Continue a released model').",
    )
    cmds = p.add_subparsers(dest="checkpoint_command", metavar="COMMAND", required=True)
    imp = cmds.add_parser(
        "import-hf", help="make a local HF model folder a parent run for CPT",
        description="Import a local Hugging Face Qwen3 / Qwen3-MoE model folder (config.json, "
        "*.safetensors, tokenizer.json) as a run with one checkpoint (step 0) that a CPT phase "
        "starts from (run.parent_run_dir). Nothing is downloaded.",
    )
    imp.add_argument("hf_dir", help="local Hugging Face model folder")
    imp.add_argument("out_run_dir", help="new run folder (must not exist or be empty)")
    imp.add_argument("--name", default="", help="run name shown by `cpt runs` (default: the "
                     "folder name of HF_DIR)")
    imp.set_defaults(func=_import)
    exp = cmds.add_parser(
        "export-hf", help="write a run's checkpoint as a transformers model folder",
        description="Write checkpoint STEP (default: the latest) of a run as model.safetensors "
        "+ config.json (+ the tokenizer of an imported model) that transformers loads as "
        "Qwen3MoeForCausalLM / Qwen3ForCausalLM.",
    )
    exp.add_argument("run", metavar="RUN_DIR[@STEP]", help="run folder, optionally @step")
    exp.add_argument("out_dir", help="output folder (must not exist or be empty)")
    exp.add_argument("--trust-checkpoint", action="store_true",
                     help="DANGEROUS: read a checkpoint that its run.json does not vouch for "
                     "(reading it unpickles, which runs code from it)")
    exp.set_defaults(func=_export)
