"""``cpt mix``: resolve a blend spec, inspect what a run will see, benchmark the mixer."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.decode import decode_first_samples, format_sample
from moe_cpt.mixer.schedule import D, advance
from moe_cpt.mixer.spec import resolve
from moe_cpt.mixer.stream import MixStream

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
    if args.decode < 0:
        raise ConfigError("--decode must be >= 0")
    ms = MixStream(blend, dss, 0, 1)
    g = blend.spec.global_batch_size
    sched = ms.schedule
    exact = args.steps * g <= SIMULATE_LIMIT
    if exact:
        counts = list(advance(ms.initial_state().point, sched, g, args.steps).counts)
    else:
        from moe_cpt.mixer.schedule import expected_counts
        counts = [round(c) for c in expected_counts(sched, g, args.steps)]
    print(f"blend {blend.fingerprint}: seq_len {blend.spec.seq_len}, global batch {g}, seed {blend.spec.seed}")
    print(f"after {args.steps} steps ({args.steps * g} samples, {'exact' if exact else 'quota, +-1'}):")
    print(f"  {'source':<16} {'version':<34} {'weight@end':>10} {'samples':>12} {'tokens':>14} {'epochs':>8} "
          f"{'replay':<6}")
    w_end = sched.weights_at(max(0, args.steps - 1))
    for i, s in enumerate(blend.sources):
        pk = ms.packings[i]
        print(f"  {s.name:<16} {s.spec:<34} {w_end[i] / D:>10.4f} {counts[i]:>12} "
              f"{counts[i] * blend.spec.seq_len:>14} {pk.epochs_for(counts[i]):>8.3f} {s.replay_mode:<6}")
    for s in blend.sources:
        if s.replay:
            r = s.replay
            print(f"  {s.name}: replay: seen = the {r.n_seen} samples parent run {r.parent_run_id} (blend "
                  f"{r.parent_blend}, source {r.parent_source}) consumed in its first {r.seen_step} steps; "
                  f"epochs count passes over them")
    if args.decode:
        print(f"first {args.decode} sample(s), decoded:")
        for d in decode_first_samples(blend, dss, args.decode):
            print(format_sample(d, args.max_chars))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from moe_cpt.mixer.blocks import CacheConfig
    from moe_cpt.mixer.dataset import open_blend
    from moe_cpt.mixer.service.record import ServeRecord
    from moe_cpt.mixer.service.server import MixService, ServiceConfig, serve_forever
    from moe_cpt.mixer.service.wire import TOKEN_ENV
    from moe_cpt.mixer.spec import load_spec_file

    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            token = open(args.token_file).read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
    blend, dss = open_blend(load_spec_file(args.spec))
    cache = CacheConfig(disk_dir=args.cache_dir, disk_bytes=args.cache_bytes, memory_bytes=args.memory_bytes,
                        prefetch_threads=args.prefetch_threads)
    cfg = ServiceConfig(host=args.host, port=args.port, token=token, max_clients=args.max_clients)
    svc = MixService(blend, dss, cfg, cache)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving blend {blend.fingerprint} ({', '.join(blend.names)}) on {svc.url}"
          f"{' (bearer token required)' if token else ''}", flush=True)
    record = None if args.no_record else ServeRecord(svc)
    serve_forever(svc, stop, record)
    if record is not None and record.run_id:
        print(f"run record: {record.run_id} (cpt runs show {record.run_id})", flush=True)
    print("mixer service stopped", flush=True)
    return 0


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
    i.add_argument("--decode", type=int, default=0, metavar="N",
                   help="also print the blend's first N samples as text, with source, shard, block and doc ids")
    i.add_argument("--max-chars", type=int, default=1000,
                   help="with --decode: cut each sample's text after this many characters (default 1000; 0 = all)")
    i.set_defaults(func=_inspect)
    s = mix.add_parser(
        "serve", help="serve a blend over HTTP to trainer ranks (see docs/service.md)",
        description="Run the mixer as a network service: clients (moe_cpt.mixer.service.client.ServiceMixedDataset) "
        "POST their (rank, world size, state) to /v1/samples and stream their samples as binary frames; "
        "GET /healthz, /metrics (Prometheus), /v1/blend, /v1/validation. Stateless: any replica of the "
        "same blend continues any client. SIGTERM/SIGINT stop it cleanly.")
    s.add_argument("spec", help="blend spec or resolved blend (YAML/TOML/JSON); pin it with `cpt mix resolve` "
                   "so that every replica serves the same versions")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                   "address requires a token)")
    s.add_argument("--port", type=int, default=8470, help="port (default 8470; 0 = any free port, printed)")
    s.add_argument("--token-file", help="file holding the shared bearer token (default: env CPT_MIX_TOKEN)")
    s.add_argument("--cache-dir", help="disk cache of raw blocks, shared by all clients (default: memory only)")
    s.add_argument("--cache-bytes", type=int, default=8 << 30, help="disk cache bound in bytes (default 8 GiB)")
    s.add_argument("--memory-bytes", type=int, default=1 << 30, help="decoded blocks in memory (default 1 GiB)")
    s.add_argument("--prefetch-threads", type=int, default=8, help="read-ahead threads (default 8)")
    s.add_argument("--max-clients", type=int, default=256, help="concurrent sample streams (default 256)")
    s.add_argument("--no-record", action="store_true", help="do not write a run record of this serving session "
                   "to the stores' run catalog (see `cpt runs ls`)")
    s.set_defaults(func=_serve, needs=("torch",))


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="cpt")
    register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
