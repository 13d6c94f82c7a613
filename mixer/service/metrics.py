"""The mixer service's counters behind ``GET /metrics`` (Prometheus text format 0.0.4; the
metric names and what they count: docs/service.md)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from moe_cpt.mixer.service.protocol import ENDPOINTS


def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServiceMetrics:
    """Counters behind ``GET /metrics`` (Prometheus text format)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.lock = threading.Lock()
        self.samples = [0] * len(names)
        self.tokens = [0] * len(names)
        self.bytes_sent = 0
        self.active = 0
        self.streams = 0
        self.requests: Counter[tuple[str, int]] = Counter()
        self.started = time.time()

    def add_samples(self, per_source: list[int], tokens_per_sample: int, nbytes: int) -> None:
        with self.lock:
            for i, c in enumerate(per_source):
                self.samples[i] += c
                self.tokens[i] += c * tokens_per_sample
            self.bytes_sent += nbytes

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint if endpoint in ENDPOINTS else "other", status)] += 1

    def open_stream(self, limit: int) -> bool:
        """Count a new sample stream in, unless ``limit`` streams are open already."""
        with self.lock:
            if self.active >= limit:
                return False
            self.active += 1
            self.streams += 1
            return True

    def close_stream(self) -> None:
        with self.lock:
            self.active -= 1

    def tokens_served(self) -> list[int]:
        """Training tokens sent so far, per source (a copy)."""
        with self.lock:
            return list(self.tokens)

    def render(self, fingerprint: str, io: dict[str, int]) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                         for labels, value in rows)

        with self.lock:
            src = [f'{{source="{_label(n)}"}}' for n in self.names]
            metric("mixer_blend_info", "gauge", "The served blend.", [(f'{{fingerprint="{fingerprint}"}}', 1)])
            metric("mixer_samples_served_total", "counter", "Samples sent to clients.", [("", sum(self.samples))])
            metric("mixer_tokens_served_total", "counter", "Training tokens sent (seq_len per sample).",
                   [("", sum(self.tokens))])
            metric("mixer_source_samples_served_total", "counter", "Samples sent, per source.",
                   list(zip(src, self.samples, strict=True)))
            metric("mixer_source_tokens_served_total", "counter", "Training tokens sent, per source.",
                   list(zip(src, self.tokens, strict=True)))
            metric("mixer_bytes_sent_total", "counter", "Sample stream bytes sent.", [("", self.bytes_sent)])
            metric("mixer_active_clients", "gauge", "Sample streams open now.", [("", self.active)])
            metric("mixer_client_streams_total", "counter", "Sample streams opened.", [("", self.streams)])
            metric("mixer_requests_total", "counter", "HTTP requests by endpoint and status.",
                   [(f'{{endpoint="{e}",code="{c}"}}', v) for (e, c), v in sorted(self.requests.items())])
            up = time.time() - self.started
        mem, disk, fetched = io.get("blocks_memory_hits", 0), io.get("blocks_disk_hits", 0), io.get("blocks_fetched", 0)
        metric("mixer_cache_blocks_total", "counter", "Block lookups by where the block came from.",
               [('{result="memory_hit"}', mem), ('{result="disk_hit"}', disk), ('{result="fetched"}', fetched)])
        lookups = mem + disk + fetched
        metric("mixer_cache_hit_ratio", "gauge", "Block lookups served from memory or disk cache.",
               [("", float((mem + disk) / lookups) if lookups else 0.0)])
        metric("mixer_store_bytes_fetched_total", "counter", "Bytes read from the object store.",
               [("", io.get("bytes_fetched", 0))])
        metric("mixer_store_retries_total", "counter", "Retried store reads.", [("", io.get("retries", 0))])
        metric("mixer_uptime_seconds", "gauge", "Seconds since the service started.", [("", float(round(up, 3)))])
        return "\n".join(lines) + "\n"
