"""``python -m moe_cpt.bench.train_bench`` (``make bench-train``): our trainer vs torchtitan's own qwen3 MoE
debug model, same size, same synthetic data, same machine; prints tokens/s, step time and the
data-wait fraction of each, and the ratio (target >= 0.95, data wait < 1%).

Both jobs call ``moe_cpt.trainer.cpu_compat.apply()`` and both models' routed experts are torchtitan's
``GroupedExperts`` class, so on CPU both run its grouped matmuls in fp32 (cpu_compat (j)): the
ratio compares like with like. After it, the fp32-vs-bf16 experts table of
:mod:`moe_cpt.bench.experts_bench` (``--experts-only``: just that; ``--no-experts``: just the
trainer comparison)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_job(which: str, out: Path, *, steps: int, seq_len: int, local_batch: int, nproc: int,
            ep: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "-m", "moe_cpt.bench.train_bench_worker", which, str(out),
           str(steps), str(seq_len), str(local_batch), str(ep)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"bench job {which} failed (rc={rc}); log: {log}\n"
                         + log.read_text()[-3000:])
    return json.loads(out.read_text())


def summarize(history: list[dict], skip: int) -> dict[str, float]:
    steps = history[skip:] or history
    return {
        "tokens_per_s_per_rank": statistics.mean(s["tokens_per_s_per_rank"] for s in steps),
        "step_time_s": statistics.mean(s["step_time_s"] for s in steps),
        "data_wait_pct": statistics.mean(s["data_wait_pct"] for s in steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_cpt.bench.train_bench", description=__doc__)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the means")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--local-batch", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--order", default="torchtitan,ours", help="which job runs first")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per trainer, interleaved A B B A ...; the best run counts "
                        "(robust to other load on a shared machine)")
    p.add_argument("--experts-only", action="store_true",
                   help="only the fp32-vs-bf16 grouped experts table (moe_cpt.bench.experts_bench)")
    p.add_argument("--no-experts", action="store_true",
                   help="only the trainer comparison, without the experts table")
    from moe_cpt.bench import experts_bench as bench_experts

    bench_experts.add_arguments(p, prefix="experts-")
    args = p.parse_args(argv)
    if not args.experts_only:
        trainer_comparison(args)
    if not args.no_experts:
        bench_experts.run(args, prefix="experts-")
    return 0


def _experts_path() -> str:
    from moe_cpt.trainer import cpu_compat

    if cpu_compat.cuda_present():
        return "torchtitan's own (bf16) in both jobs (CUDA: cpu_compat changes nothing)"
    return "fp32 in both jobs (cpu_compat (j): the same patched GroupedExperts class)"


def trainer_comparison(args: argparse.Namespace) -> None:
    """Our trainer vs torchtitan's (the ratio); prints the table."""
    order = args.order.split(",")
    schedule: list[str] = []
    for i in range(args.repeats):
        schedule += order if i % 2 == 0 else order[::-1]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cpt-bench-") as tmp:
        for i, which in enumerate(schedule):
            history = run_job(which, Path(tmp) / f"{which}-{i}.json", steps=args.steps,
                              seq_len=args.seq_len, local_batch=args.local_batch,
                              nproc=args.nproc, ep=args.ep)
            r = summarize(history, args.skip)
            print(f"  run {i + 1}/{len(schedule)} {which}: {r['tokens_per_s_per_rank']:.1f} "
                  f"tokens/s/rank", flush=True)
            best = results.get(which)
            if best is None or r["tokens_per_s_per_rank"] > best["tokens_per_s_per_rank"]:
                results[which] = r
    tt, ours = results["torchtitan"], results["ours"]
    ratio = ours["tokens_per_s_per_rank"] / tt["tokens_per_s_per_rank"]
    print(f"\nqwen3 debugmodel_moe shape (dim 256, 8 layers, 64 experts top-8), "
          f"{args.nproc} procs, EP={args.ep}, seq {args.seq_len}, local batch "
          f"{args.local_batch}, steps {args.skip + 1}..{args.steps}")
    print(f"{'trainer':<12}{'tokens/s/rank':>15}{'step time s':>13}{'data wait %':>13}")
    for name, r in (("torchtitan", tt), ("ours", ours)):
        print(f"{name:<12}{r['tokens_per_s_per_rank']:>15.1f}{r['step_time_s']:>13.3f}"
              f"{r['data_wait_pct']:>13.3f}")
    print(f"ratio ours/torchtitan: {ratio:.3f} (target >= 0.95); "
          f"data wait {ours['data_wait_pct']:.3f}% (target < 1%)")
    print(f"grouped experts: {_experts_path()}")


if __name__ == "__main__":
    sys.exit(main())
