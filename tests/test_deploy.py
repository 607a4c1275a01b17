"""deploy/: the Prometheus alert rules (checked and unit-tested by promtool, from Debian's ``prometheus``
package, which ``make test`` installs when missing) and the Grafana dashboard, whose every query names only
metrics the worker and the receiver export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from arq.constants import default_queue_name, in_progress_key_prefix
from prometheus_client import CollectorRegistry

from cgb_worker.deadletters import DeadLetters
from cgb_worker.metrics import Metrics, QueueGauges, ReceiverMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "cgb-worker.json"
# PromQL's own words, and the label names that follow `by`/`without`
PROMQL = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "delta", "absent", "or", "and",
    "unless", "histogram_quantile", "le", "clamp_min", "status", "outcome", "endpoint", "error_class", "code",
    "reason", "category", "kind", "result", "instance",
}  # fmt: skip


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, (
        "promtool is missing: `make test` installs Debian's prometheus package (or: apt-get install prometheus)"
    )
    return found


def test_the_alert_rules_are_valid() -> None:
    done = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    """deploy/prometheus/alerts.test.yml: series that raise each alert and healthy ones beside them."""
    done = subprocess.run(
        [_promtool(), "test", "rules", "alerts.test.yml"],
        capture_output=True, text=True, check=False, cwd=RULES.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {t["alertname"] for case in yaml.safe_load((RULES.parent / "alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}  # fmt: skip
    assert tested == {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def test_a_broken_expectation_fails_the_rule_tests(tmp_path: Path) -> None:
    """The rule tests can fail: the backlog bound moved from 300 s to 900 s no longer fires where they expect."""
    shutil.copy(RULES.parent / "alerts.test.yml", tmp_path)
    (tmp_path / "alerts.yml").write_text(
        RULES.read_text().replace("cgb_queue_oldest_ready_seconds) > 300", "cgb_queue_oldest_ready_seconds) > 900")
    )
    done = subprocess.run(
        [_promtool(), "test", "rules", "alerts.test.yml"], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "alertname: CGBQueueBacklog" in done.stdout + done.stderr


async def _exported(redis_client: Any) -> set[str]:
    """Every sample name the worker's and the receiver's registries can serve, the queue's gauges included
    (read from a real Redis)."""
    names: set[str] = set()
    worker, receiver = Metrics(), ReceiverMetrics()
    gauges = QueueGauges(redis_client, default_queue_name, in_progress_key_prefix, DeadLetters(redis_client))
    await gauges.refresh()
    queue = CollectorRegistry()
    queue.register(gauges)
    for registry in (worker.registry, receiver.registry, queue):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
            names |= {family.name + s for s in suffixes}
    return names


def _queries() -> list[str]:
    rules = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return rules + [t["expr"] for p in panels for t in p.get("targets", [])]


async def test_every_metric_queried_is_exported(redis_client: Any) -> None:
    exported = await _exported(redis_client)
    named: set[str] = set()
    for query in _queries():
        query = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', "", query)  # selectors, strings and ranges
        named |= {w for w in re.findall(r"[a-z_][a-z0-9_]*", query) if w not in PROMQL}
    assert named, "no metric found in the queries"
    assert named - exported == set()
    assert {"cgb_queue_oldest_ready_seconds", "cgb_deliveries_total", "cgb_request_duration_seconds_bucket"} <= named


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cgb-worker"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


@pytest.mark.parametrize("query", [q for q in _queries() if "cgb_queue" in q or "cgb_workers" in q])
def test_fleet_wide_gauges_are_never_summed(query: str) -> None:
    """Every worker serves the same queue and fleet gauges: summed, they would count each N times."""
    assert "sum" not in re.findall(r"[a-z_]+", query)
