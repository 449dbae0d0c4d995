"""The config file: read at start (the embedded default without one) and again on SIGHUP, by
a single process and by a supervisor alike."""

from __future__ import annotations

import logging
from pathlib import Path

from . import oplog
from .defaults import default_config_text
from .errors import ConfigError
from .metrics import ConfigReloads
from .sansio.config import Config
from .sansio.config_load import load_config_text

log = logging.getLogger("trio_sni")


def read_config(path: str | None) -> Config:
    """Load ``path``, or the embedded default when ``path`` is None.

    Raises:
        ConfigError: with every problem listed; also for an unreadable file.
    """
    if path is None:
        return load_config_text(default_config_text(), source="<default config>")
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_config_text(text, source=path)


def reload_config(path: str | None, reloads: ConfigReloads) -> Config | None:
    """SIGHUP: the new config, checked, with its ``log.level`` applied, or ``None`` (no file,
    or a bad one: said once, and the running config stays). ``reloads`` records which."""
    if path is None:
        log.warning("SIGHUP: running on the embedded default config; nothing to reload")
        return None
    try:
        config = read_config(path)
    except ConfigError as exc:
        log.error("SIGHUP: %s: %s\nkeeping the current config", path, exc)
        reloads.failed()
        return None
    reloads.succeeded()
    oplog.apply_level(config)
    return config
