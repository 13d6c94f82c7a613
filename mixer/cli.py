"""``cpt mix``: resolve a blend spec, inspect what a run will see, benchmark the mixer."""

from __future__ import annotations

import argparse
import json
import sys

from cpt.errors import ConfigError
from mixer.schedule import D, advance
from mixer.spec import resolve
from mixer.stream import MixStream

SIMULATE_LIMIT = 5_000_000  # samples; beyond, counts come from the exact quota (within one)


def _resolve(args: argparse.Namespace) -> int:
    blend, _ = resolve(args.spec)
    text = json.dumps(blend.to_json(), indent=1, sort_keys=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"resolved blend {blend.fingerprint} -> {args.output}")
    else:
        print(text)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    blend, dss = resolve(args.spec)
    if args.steps < 0:
        raise ConfigError("--steps must be >= 0")
    ms = MixStream(blend, dss, 0, 1)
    g = blend.spec.global_batch_size
    sched = ms.schedule
    exact = args.steps * g <= SIMULATE_LIMIT
    if exact:
        counts = list(advance(ms.initial_state().point, sched, g, args.steps).counts)
    else:
        from mixer.schedule import expected_counts
        counts = [round(c) for c in expected_counts(sched, g, args.steps)]
    print(f"blend {blend.fingerprint}: seq_len {blend.spec.seq_len}, global batch {g}, seed {blend.spec.seed}")
    print(f"after {args.steps} steps ({args.steps * g} samples, {'exact' if exact else 'quota, +-1'}):")
    print(f"  {'source':<16} {'version':<34} {'weight@end':>10} {'samples':>12} {'tokens':>14} {'epochs':>8}")
    w_end = sched.weights_at(max(0, args.steps - 1))
    for i, s in enumerate(blend.sources):
        pk = ms.packings[i]
        print(f"  {s.name:<16} {s.spec:<34} {w_end[i] / D:>10.4f} {counts[i]:>12} "
              f"{counts[i] * blend.spec.seq_len:>14} {pk.epochs_for(counts[i]):>8.3f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mixer.bench import run
    return run(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mix", help="blend dataset versions into a deterministic training stream")
    mix = p.add_subparsers(dest="mix_command", metavar="SUBCOMMAND", required=True)
    r = mix.add_parser("resolve", help="pin every source's ref to a version id and print the resolved blend")
    r.add_argument("spec", help="blend spec (YAML or TOML)")
    r.add_argument("-o", "--output", help="write the resolved blend JSON here")
    r.set_defaults(func=_resolve)
    i = mix.add_parser("inspect", help="per-source samples, tokens and epochs after N steps")
    i.add_argument("spec")
    i.add_argument("--steps", type=int, required=True)
    i.set_defaults(func=_inspect)
    b = mix.add_parser("bench", help="throughput, resume time, RSS, bytes fetched/consumed (tables)")
    from mixer.bench import add_arguments
    add_arguments(b)
    b.set_defaults(func=_bench)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="cpt")
    register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
