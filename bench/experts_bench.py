"""``python -m moe_cpt.bench.experts_bench`` (also part of ``python -m moe_cpt.bench.train_bench``; alone:
``python -m moe_cpt.bench.train_bench --experts-only``): the step time of a tiny MoE with torchtitan's
grouped experts in fp32 (:mod:`moe_cpt.trainer.cpu_compat` (j), what CPU training uses) against
torchtitan's own bf16 path, on the same model, weights and tokens, in one process.

A step is one forward and backward pass of random tokens through the model (LM cross-entropy;
no optimizer). The two paths alternate in rounds (fp32 first in even rounds, bf16 first in odd
ones) so that other load on a shared machine hits both alike; the figure is the median step
time per path over all rounds, warm-up steps left out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moe_cpt.trainer  # noqa: F401  (triton stub before torchtitan model imports)
from moe_cpt.trainer import cpu_compat

FLAVORS: tuple[str, ...] = ("tiny_moe", "bench_moe")


@dataclass(frozen=True)
class ExpertsResult:
    flavor: str
    batch: int
    seq_len: int
    steps: int  # timed steps per path
    fp32_s: float  # median step time, fp32 experts
    bf16_s: float  # median step time, torchtitan's bf16 experts
    loss_diff: float  # |loss fp32 - loss bf16| on the same first batch

    @property
    def speedup(self) -> float:
        return self.bf16_s / self.fp32_s


def _model_and_tokens(flavor: str, batch: int, seq_len: int, seed: int):
    from moe_cpt.trainer.models import SHAPES, build_model_config

    torch.manual_seed(seed)
    model = build_model_config(flavor, router="aux_free").build()
    model.init_weights(buffer_device=None)
    model.train()
    vocab = SHAPES[flavor].vocab_size
    gen = torch.Generator().manual_seed(seed)
    return model, lambda: torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def _timed_steps(model: torch.nn.Module, tokens, n: int) -> list[float]:
    times = []
    for _ in range(n):
        batch = tokens()
        t0 = time.perf_counter()
        _loss(model, batch).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return times


def bench_flavor(flavor: str, *, batch: int, seq_len: int, rounds: int, steps: int,
                 warmup: int, seed: int = 0) -> ExpertsResult:
    """Median step time of ``flavor`` with the fp32 experts and with torchtitan's bf16 ones."""
    if not cpu_compat.apply():
        raise SystemExit("moe_cpt.bench.experts_bench compares the CPU paths; CUDA is present")
    model, tokens = _model_and_tokens(flavor, batch, seq_len, seed)
    first = tokens()
    with torch.no_grad():
        loss32 = float(_loss(model, first))
        with cpu_compat.stock_grouped_experts():
            loss16 = float(_loss(model, first))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(rounds):
        for path in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            if path == "bf16":
                with cpu_compat.stock_grouped_experts():
                    t = _timed_steps(model, tokens, warmup + steps)
            else:
                t = _timed_steps(model, tokens, warmup + steps)
            times[path] += t[warmup:]
    return ExpertsResult(flavor=flavor, batch=batch, seq_len=seq_len, steps=len(times["fp32"]),
                         fp32_s=statistics.median(times["fp32"]),
                         bf16_s=statistics.median(times["bf16"]),
                         loss_diff=abs(loss32 - loss16))


def print_table(results: list[ExpertsResult]) -> None:
    print("\nMoE grouped experts on CPU: fp32 (cpu_compat (j), what CPU training uses) vs "
          "torchtitan's bf16 path; one process, forward+backward of random tokens, median "
          "step time (paths interleaved; a shared machine: figures are noisy)")
    print("(|dloss|: the loss difference of the two paths on the same first batch)")
    print(f"{'flavor':<12}{'tokens':>8}{'steps':>7}{'fp32 step s':>13}{'bf16 step s':>13}"
          f"{'bf16/fp32':>11}{'|dloss|':>10}")
    for r in results:
        print(f"{r.flavor:<12}{r.batch * r.seq_len:>8}{r.steps:>7}{r.fp32_s:>13.4f}"
              f"{r.bf16_s:>13.4f}{r.speedup:>10.2f}x{r.loss_diff:>10.1e}")


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The bench's options, named ``--{prefix}flavors`` etc."""
    p.add_argument(f"--{prefix}flavors", default=",".join(FLAVORS))
    p.add_argument(f"--{prefix}batch", type=int, default=4)
    p.add_argument(f"--{prefix}seq-len", type=int, default=128)
    p.add_argument(f"--{prefix}rounds", type=int, default=2)
    p.add_argument(f"--{prefix}steps", type=int, default=3, help="timed steps per path a round")
    p.add_argument(f"--{prefix}warmup", type=int, default=1, help="untimed steps per path a round")


def run(args: argparse.Namespace, prefix: str = "") -> list[ExpertsResult]:
    """Bench and print the flavors of ``args`` (from :func:`add_arguments` with ``prefix``)."""
    def arg(name: str) -> object:
        return getattr(args, (prefix + name).replace("-", "_"))

    # torchtitan's router asks CPU autocast for fp32 (unsupported; it warns every step)
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
    results = [bench_flavor(f, batch=int(arg("batch")), seq_len=int(arg("seq-len")),
                            rounds=int(arg("rounds")), steps=int(arg("steps")),
                            warmup=int(arg("warmup")))
               for f in str(arg("flavors")).split(",")]
    print_table(results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_cpt.bench.experts_bench", description=__doc__)
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
