"""Reading the pipeline's Ray metrics (actors/metrics.py) back in tests: scrape this node's Prometheus export
endpoint and poll it until the expected series are there (Ray exports every few seconds).

Shared by tests/test_metrics.py (scorer, trainer group, driver) and tests/test_actors_pipeline.py (the real vLLM
generators). An actor's last values leave its process only with its next export: keep the actor alive until
`wait_for` returns.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import export_urls

SCRAPE_DEADLINE_S = 60.0  # Ray's export interval is ~10 s; the 2 shared cores may be busy


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    value: float


def endpoint() -> str:
    """This node's metrics export endpoint, on 127.0.0.1 (Ray's port: random unless fixed at ray.init)."""
    import ray

    [node] = [n for n in ray.nodes() if n["Alive"]]
    port = node["MetricsExportPort"]
    assert export_urls() == [f"http://{node['NodeManagerAddress']}:{port}/metrics"]
    return f"http://127.0.0.1:{port}/metrics"


def scrape(url: str) -> list[Series]:
    """Every `ray_llama2_*` sample on the endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [Series(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("ray_llama2_")]


def find(series: list[Series], name: str, **labels: str) -> list[Series]:
    return [s for s in series if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def one(series: list[Series], name: str, **labels: str) -> float:
    [match] = find(series, name, **labels)
    return match.value


def wait_for(expected: Sequence[tuple[str, dict[str, str]]], deadline_s: float = SCRAPE_DEADLINE_S) -> list[Series]:
    """Poll the endpoint until every (exported name, labels) in `expected` has a series; the last scrape.

    Fails, naming what is missing, after `deadline_s`.
    """
    url, deadline = endpoint(), time.monotonic() + deadline_s
    while True:
        series = scrape(url)
        missing = [(name, labels) for name, labels in expected if not find(series, name, **labels)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # poll: Ray exports every few seconds
    assert not missing, (f"not on {url} after {deadline_s:.0f} s: {missing}; llama2 series there: "
                         f"{sorted({s.name for s in series})}")
    return series
