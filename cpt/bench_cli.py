"""`cpt bench ...`: benchmarks printed as tables with ratios (speed targets live here, not in tests)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run benchmarks (tables with ratios)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bsub.add_parser("corpus", help="tokens/s per core: our pipeline vs raw tokenizers vs datatrove")
    p.add_argument("--raw", default="data/raw", help="demo input folder (written if missing)")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs")
    p.set_defaults(func=cmd_corpus)


def cmd_corpus(args: argparse.Namespace) -> int:
    from bench.corpus_bench import bench_corpus, print_table

    print_table(bench_corpus(args.raw, args.repeat))
    return 0
