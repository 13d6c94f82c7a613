"""`cpt bench ...`: benchmarks printed as tables with ratios (speed targets live here, not in tests)."""

from __future__ import annotations

import argparse

from moe_cpt.bench import mixer_bench, service_bench


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run benchmarks (tables with ratios)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bsub.add_parser("corpus", help="tokens/s per core: our pipeline vs raw tokenizers vs datatrove")
    p.add_argument("--raw", default="data/raw", help="demo input folder (written if missing)")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs")
    p.set_defaults(func=cmd_corpus)
    m = bsub.add_parser("mixer", help="mixer throughput, resume time, RSS, bytes fetched/consumed (tables)")
    mixer_bench.add_arguments(m)
    m.set_defaults(func=mixer_bench.run, needs=("torch",))
    s = bsub.add_parser("service", help="tokens/s through the mixer service on loopback vs in-process",
                        description="Build a synthetic store, then print tokens/s of the in-process mixer "
                        "(warm disk cache), of one client of a `cpt mix serve` subprocess on loopback, and "
                        "of N concurrent client processes.")
    service_bench.add_arguments(s)
    s.set_defaults(func=service_bench.run, needs=("torch",))


def cmd_corpus(args: argparse.Namespace) -> int:
    from moe_cpt.bench.corpus_bench import bench_corpus, print_table

    print_table(bench_corpus(args.raw, args.repeat))
    return 0
