"""Log levels for the command line and ``LOGLEVEL``: only the ``maskdino_lrp`` logger tree is configured.

``-v`` or ``LOGLEVEL=DEBUG`` show this tool's own messages; third-party loggers (matplotlib's font
manager, PIL's PNG chunk reader, …) stay at their default level and so stay quiet. Warnings print as
``maskdino-lrp: warning: …`` on stderr. A ``LOGLEVEL`` that is not a level is a one-line warning, and
WARNING is used.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

LOGGER = "maskdino_lrp"
PROG = "maskdino-lrp"
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}
_COMPLAINED: set[str] = set()  # each bad LOGLEVEL is reported once per process


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (test capture and progress bars swap it)."""

    tag = "maskdino_lrp.logsetup"

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    """``maskdino-lrp: warning: …`` at the default level; time, logger and level when debugging."""

    def __init__(self, detailed: bool) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s: %(message)s")
        self.detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        if self.detailed:
            return super().format(record)
        text = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def parse_level(text: str | None) -> tuple[int | None, str | None]:
    """``LOGLEVEL`` text → (level, None), (None, None) when empty, or (None, one-line complaint)."""
    if text is None or not text.strip():
        return None, None
    value = text.strip()
    if value.lstrip("-").isdigit():
        return int(value), None
    name = _ALIASES.get(value.upper(), value.upper())
    if name in LEVEL_NAMES:
        return getattr(logging, name), None
    return None, (f"LOGLEVEL={text!r} is not a log level (use {', '.join(LEVEL_NAMES)}); using WARNING")


def configure(verbose: int = 0, env: str | None = None) -> int:
    """Set the ``maskdino_lrp`` loggers' level (``-v``: DEBUG, else ``env`` — the LOGLEVEL text —, else WARNING)
    and give them one stderr handler; the root logger and third-party loggers are left alone. Returns the level."""
    level, complaint = (logging.DEBUG, None) if verbose else parse_level(env)
    if level is None:
        level = logging.WARNING
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "tag", None) == _StderrHandler.tag:
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(detailed=level < logging.WARNING))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per record, whatever the root logger has
    if complaint and complaint not in _COMPLAINED:
        _COMPLAINED.add(complaint)
        logger.warning("%s", complaint)
    return level


@contextlib.contextmanager
def configured(verbose: int = 0, env: str | None = None) -> Iterator[int]:
    """:func:`configure` for the duration of a command; the logger's previous state comes back afterwards
    (so a command run in-process, as the tests do, leaves the caller's logging as it was)."""
    logger = logging.getLogger(LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield configure(verbose, env)
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def configure_from_environment(env: str | None) -> None:
    """At import: honour ``LOGLEVEL`` for library users without touching the root logger. The level is set
    on the ``maskdino_lrp`` loggers; a handler is added only when the program has configured no logging."""
    level, complaint = parse_level(env)
    logger = logging.getLogger(LOGGER)
    if level is None and complaint is None:
        return
    if complaint:
        if complaint not in _COMPLAINED:
            _COMPLAINED.add(complaint)
            print(f"{PROG}: warning: {complaint}", file=sys.stderr)
        level = logging.WARNING
    logger.setLevel(level)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_Formatter(detailed=level < logging.WARNING))
        logger.addHandler(handler)
        logger.propagate = False
