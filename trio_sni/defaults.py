"""The embedded default config, shipped inside the package so a bare install runs."""

from __future__ import annotations

from importlib import resources


def default_config_text() -> str:
    """The embedded default config (JSON) exactly as shipped."""
    return resources.files("trio_sni").joinpath("default_config.json").read_text("utf-8")
