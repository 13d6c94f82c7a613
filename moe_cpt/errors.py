"""Errors meant for the user: the CLI prints them as one readable line, without a traceback."""

from __future__ import annotations


class CptError(Exception):
    """Base class of every error the user can act on (bad input, bad config, missing data)."""


class ConfigError(CptError):
    """A configuration file or command-line option is invalid."""


class InputDataError(CptError):
    """An input file is malformed; the message names the file (and line where known)."""


class IntegrityError(CptError):
    """Stored data does not match its recorded checksum or size."""


class NotFoundError(CptError):
    """A dataset, version, ref or file that was asked for does not exist."""


class StoreError(CptError):
    """The object store cannot be reached, refuses the request, or lacks the bucket."""


class BusyError(CptError):
    """Another process holds the lock on what was asked for (e.g. the same build)."""
