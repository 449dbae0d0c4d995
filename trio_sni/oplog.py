"""The operational log (start-up, reloads, warnings; not the access log): where it goes and
in which format, from ``log.file`` and ``log.format``."""

from __future__ import annotations

import json
import logging
import logging.handlers

from .connection import rfc3339_ms
from .sansio.config import Config


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (as the access log's), ``level``, ``logger``,
    ``worker`` (under a supervisor), ``message`` and, for an error with one, ``exception``."""

    def __init__(self, worker: str | None) -> None:
        super().__init__()
        self._worker = None if worker is None else int(worker)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": rfc3339_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure(config: Config, worker: str | None) -> None:
    """Send the root logger's records to stderr or ``log.file`` in ``log.format``.

    A file is a ``WatchedFileHandler``: it notices that logrotate moved the file and opens a
    new one, with no signal. Raises ``OSError`` if the file cannot be opened.
    """
    handler: logging.Handler
    if config.log.file is None:
        handler = logging.StreamHandler()
    else:
        handler = logging.handlers.WatchedFileHandler(config.log.file, encoding="utf-8")
    if config.log.format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


#: Set by ``--log-level``: a reloaded config's ``log.level`` does not change it then.
_level_from_command_line = False


def apply_level(config: Config, command_line: str | None = None) -> None:
    """Log at ``command_line`` (``--log-level``, at start) or else ``config``'s
    ``log.level`` (at start and on every reload; a change is logged)."""
    global _level_from_command_line
    root = logging.getLogger()
    if command_line is not None:
        _level_from_command_line = True
        root.setLevel(command_line.upper())
        return
    level = logging.getLevelName(config.log.level.upper())
    if _level_from_command_line or root.level == level:
        return
    changed = root.level != logging.NOTSET
    root.setLevel(level)
    if changed:
        logging.getLogger("trio_sni").info("log level: now %s", config.log.level)
