"""`cpt bench ...`: benchmarks printed as tables with ratios (speed targets live here, not in tests)."""

from __future__ import annotations

import argparse

from moe_cpt.bench import mixer_bench, service_bench


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run benchmarks (tables with ratios)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bsub.add_parser("corpus", help="tokens/s per core with and without dedup vs raw tokenizers and datatrove; "
                                       "1 vs 2 workers beside the machine's own 1 vs 2 process scaling; peak RSS; "
                                       "dedup precision/recall vs datatrove")
    p.add_argument("--raw", default="data/raw", help="demo input folder (written if missing)")
    p.add_argument("--tokens", type=int, default=50_000_000, help="size of the generated input (default 50M)")
    p.add_argument("--peer-tokens", type=int, default=10_000_000,
                   help="input size for the MinHash-stages comparison with datatrove (default 10M)")
    p.add_argument("--no-quality", action="store_true", help="skip the planted-duplicates precision/recall table")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs per measurement (least CPU time; least wall time for the "
                   "worker-scaling runs, which are interleaved)")
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
    from moe_cpt.bench.corpus_bench import bench_corpus, print_report

    print_report(bench_corpus(args.raw, args.tokens, args.peer_tokens, quality=not args.no_quality,
                              repeat=args.repeat))
    return 0
