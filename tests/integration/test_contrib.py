"""contrib/: every metric the alert rules and the Grafana dashboard query is one a live daemon
exports (by sample name, as Prometheus stores it: counters with _total, histograms with
_bucket/_sum/_count)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio
import yaml

from ..test_status import client, start

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
NAME = re.compile(r"\bbackfilld_[a-z0-9_]+")


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((CONTRIB / "prometheus" / "backfilld.rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def grafana_exprs() -> list[str]:
    dashboard = json.loads((CONTRIB / "grafana" / "backfilld.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def exported(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


async def test_contrib_queries_only_metrics_the_daemon_exports(nursery: trio.Nursery,
                                                                database: str) -> None:
    daemon = await start(nursery, database)
    async with client(daemon) as http:
        await http.get("/api/v1/admin/features/staleness")  # warm the series gauges' cache
        with trio.fail_after(10):
            while "backfilld_features_lag_seconds{" not in (text := (  # noqa: ASYNC110
                    await http.get("/metrics")).text):
                await trio.sleep(0.1)
    names = exported(text)
    for source, exprs in (("rules", rule_exprs()), ("grafana", grafana_exprs())):
        assert exprs, source
        used = {n for e in exprs for n in NAME.findall(e)}
        assert used, source
        assert used <= names, (source, sorted(used - names))


def test_every_panel_has_a_query_and_a_unique_id() -> None:
    dashboard = json.loads((CONTRIB / "grafana" / "backfilld.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(p.get("targets") for p in dashboard["panels"])
