"""The deployment kit in docs/deploy: a systemd unit systemd accepts, a logrotate snippet that
signals the proxy the way it listens, and the licence pyproject.toml names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from proxytest import need

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy"


def _directives(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with no complaint (it also checks that ExecStart's program
    exists: this test's Python stands in for the unit's /opt/trio-sni venv)."""
    text = (DEPLOY / "trio-sni.service").read_text()
    unit = tmp_path / "trio-sni.service"
    unit.write_text(text.replace("/opt/trio-sni/bin/python", sys.executable))
    result = subprocess.run(
        [need("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_the_unit_grants_exactly_what_kernel_mode_needs() -> None:
    unit = (DEPLOY / "trio-sni.service").read_text()
    wanted = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_NET_BIND_SERVICE"}
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        [value] = _directives(unit, key)
        assert set(value.split()) == wanted
    assert _directives(unit, "User") == ["trio-sni"]
    assert _directives(unit, "NoNewPrivileges") == ["yes"]
    assert _directives(unit, "Type") == ["notify"]
    assert "/sys/fs/bpf/trio_sni" in _directives(unit, "ReadWritePaths")[0]


def test_logrotate_signals_sigusr1() -> None:
    snippet = (DEPLOY / "trio-sni.logrotate").read_text()
    assert "--signal=SIGUSR1" in snippet
    assert "/var/log/trio-sni/access.log" in snippet


def test_the_licence_is_the_one_pyproject_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_the_alert_rules_load_and_fire_on_their_series() -> None:
    """``promtool check rules`` on the rule file, and ``promtool test rules`` on its unit
    tests (docs/deploy/trio-sni-alerts.test.yml: the alerts fire on the series they watch)."""
    promtool = need("promtool")
    for command in ("check", "test"):
        name = "trio-sni-alerts.yml" if command == "check" else "trio-sni-alerts.test.yml"
        result = subprocess.run(
            [promtool, command, "rules", name],
            cwd=DEPLOY,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_container_and_daemonset_grant_what_the_unit_grants() -> None:
    """One set of capabilities in every deployment example (docs/operations.md's table)."""
    unit = (DEPLOY / "trio-sni.service").read_text()
    [granted] = _directives(unit, "AmbientCapabilities")
    wanted = {cap.removeprefix("CAP_") for cap in granted.split()}
    daemonset = (DEPLOY / "daemonset.yaml").read_text()
    [added] = [line for line in daemonset.splitlines() if line.strip().startswith("add: [")]
    assert set(added.split("[", 1)[1].rstrip("]").replace(" ", "").split(",")) == wanted
    container = (DEPLOY / "Containerfile").read_text()
    # Docker grants NET_BIND_SERVICE by default; the others must be added.
    assert set(re.findall(r"--cap-add (\w+)", container)) == wanted - {"NET_BIND_SERVICE"}
    assert '"-m", "trio_sni", "--config"' in container


def test_the_alerts_and_the_dashboard_use_only_metrics_the_proxy_exports() -> None:
    """Every series name in the alert rules and the Grafana dashboard is in a proxy's
    /metrics (the supervisor's own, ``trio_sni_worker_*``, in its merged answer)."""
    from prometheus_client import generate_latest

    from trio_sni import workers_status
    from trio_sni.sansio.config_load import load_config
    from trio_sni.server import Proxy

    config = {
        "workers": 1,
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        "rules": [{"match": "a.test"}],
        "ebpf": {"sockmap": {"enabled": False}},
    }
    proxy = Proxy(load_config(config), access_log=lambda record: None)
    text = generate_latest(proxy.metrics.registry).decode()
    exported = set(re.findall(r"^(?:# TYPE )?([a-z_]+)", text, re.MULTILINE))
    supervisor = Path(workers_status.__file__).read_text()
    dashboard = (DEPLOY / "grafana-dashboard.json").read_text()
    panels = json.loads(dashboard)["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for name in ("trio-sni-alerts.yml", "grafana-dashboard.json"):
        used = set(re.findall(r"\b((?:trio_sni|process)_[a-z_]+)", (DEPLOY / name).read_text()))
        missing = {
            series
            for series in used - exported
            if f'"{series.removesuffix("_total")}"' not in supervisor
        }
        assert not missing, f"{name} uses series no proxy exports: {sorted(missing)}"
