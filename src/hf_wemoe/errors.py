"""Errors that the command line reports as one line and exit code 2."""

from __future__ import annotations


class WEMoEError(Exception):
    """A problem with the user's input: what is wrong and what to do, in one line.

    The CLI prints ``error: <message>`` and exits with code 2; library users can catch it.
    """


class SourceError(WEMoEError):
    """A model or dataset reference cannot be resolved or read."""


class IncompatibleModelsError(WEMoEError):
    """Experts and base do not share an architecture (names the offending tensor)."""
