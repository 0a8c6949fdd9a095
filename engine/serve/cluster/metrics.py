"""The replicas' metrics in one place: each replica pushes its Prometheus text to a
small named actor (:class:`MetricsBoard`) every ``METRICS_PERIOD_S``; the ingress reads
them and shows every live replica's series with a ``replica`` label."""

from __future__ import annotations

import math
import time
from typing import Any

from .config import NAMESPACE

METRICS_PERIOD_S = 2.0  # how often a replica pushes its metrics
METRICS_MAX_AGE_S = 30.0  # a replica silent this long (gone) drops out of /metrics


class MetricsBoard:
    """The replicas' latest Prometheus text, by replica (a Ray actor, no CPU reserved)."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self.reports[replica] = (time.time(), text)

    def read(self) -> dict[str, str]:
        now = time.time()
        self.reports = {r: v for r, v in self.reports.items() if now - v[0] < METRICS_MAX_AGE_S}
        return {r: text for r, (_, text) in self.reports.items()}


def metrics_board(app_name: str) -> Any:
    """The app's metrics actor, created by the first to ask (it lives as long as its creator)."""
    import ray

    return (
        ray.remote(num_cpus=0)(MetricsBoard)
        .options(name=f"metrics-{app_name}", namespace=NAMESPACE, get_if_exists=True)
        .remote()
    )


def merge_metrics(reports: dict[str, str]) -> str:
    """The replicas' Prometheus texts as one, each series labelled with its replica (the
    text format's names: a counter's family is written under its ``_total`` name; the
    optional ``_created`` series are left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(reports.items()):
        for family in text_string_to_metric_families(text):
            name = f"{family.name}_total" if family.type == "counter" else family.name
            _, _, lines = families.setdefault(name, (family.documentation, family.type, []))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = {**sample.labels, "replica": replica}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{body}}} {_number(sample.value)}")
    out = []
    for name, (documentation, kind, lines) in families.items():
        documentation = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out += [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n" if out else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
