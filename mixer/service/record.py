"""The mixer service's run record in the store catalog (``cpt runs``): one ``kind: mix`` run per
``cpt mix serve`` session. No HTTP here: it records anything :class:`Served` (the service)."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from moe_cpt.errors import CptError
from moe_cpt.mixer.spec import ResolvedBlend
from moe_cpt.mixer.stream_record import record_mix_stream

log = logging.getLogger(__name__)


class Served(Protocol):
    """What a run record needs of a running service."""

    blend: ResolvedBlend
    names: list[str]

    @property
    def url(self) -> str: ...

    def tokens_served(self) -> list[int]: ...


class ServeRecord:
    """The service's run record in the store catalog (``cpt runs``): one ``kind: mix`` run per
    ``cpt mix serve`` session with the resolved blend and the tokens served per source, updated
    every ``every_s`` seconds while they change and finished on shutdown. A catalog that cannot be
    written is logged and retried at the next update; serving goes on."""

    def __init__(self, service: Served, every_s: float = 60.0):
        self.service = service
        self.every_s = every_s
        self.run_id: str | None = None
        self._last: list[int] | None = None
        self._next = 0.0

    def update(self, status: str = "running", force: bool = False) -> None:
        tokens = self.service.tokens_served()
        now = time.monotonic()
        if not force and (now < self._next or tokens == self._last):
            return
        self._next = now + self.every_s
        try:
            self.run_id = record_mix_stream(
                self.service.blend.to_json(), dict(zip(self.service.names, tokens, strict=True)),
                run_id=self.run_id, status=status, extra={"service": {"url": self.service.url}})
            self._last = tokens
        except (CptError, OSError) as exc:
            log.warning("mixer service: could not write its run record: %s", exc)
