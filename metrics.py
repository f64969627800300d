"""What the serving engine counts, and the page serve.py shows at /metrics, in Prometheus's text format
(https://prometheus.io/docs/instrumenting/exposition_formats/): counters of requests by outcome, tokens,
steps and preemptions, gauges of waiting and running requests, histograms of latencies."""
from collections import Counter
from dataclasses import dataclass

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
OUTCOMES = ("stop", "length", "cancelled")  # how a request ends (engine.Request)
# prompt tokens prefilled, and those found in a row's kept tokens instead (prefix reuse)
COUNTED = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "decode_steps", "preemptions", "swaps_in")


class Histogram:
    """Observations counted into cumulative buckets, as Prometheus histograms are: bucket i counts those at
    most bounds[i]; the last bucket (+Inf) counts all of them."""

    def __init__(self, bounds: tuple = LATENCY_BOUNDS):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1
        self.sum += value

    def copy(self) -> "Histogram":
        copied = Histogram(self.bounds)
        copied.counts, copied.sum = list(self.counts), self.sum
        return copied


@dataclass
class Snapshot:
    """The engine's figures at one moment (Engine.snapshot). counts: requests_<outcome> and COUNTED."""
    counts: Counter
    waiting_per_queue: list
    running: int
    time_to_first_token: Histogram
    inter_token_latency: Histogram


def histogram_lines(name: str, histogram: Histogram) -> list:
    """A histogram in Prometheus's text format: cumulative buckets, then the sum and count."""
    bounds = [str(bound) for bound in histogram.bounds] + ["+Inf"]
    return ([f"# TYPE {name} histogram"] +
            [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(bounds, histogram.counts)] +
            [f"{name}_sum {histogram.sum:.6f}", f"{name}_count {histogram.counts[-1]}"])


def prometheus_text(snapshot: Snapshot) -> str:
    lines = ["# TYPE brisk_requests_total counter"]
    lines += [f'brisk_requests_total{{outcome="{outcome}"}} {snapshot.counts[f"requests_{outcome}"]}'
              for outcome in OUTCOMES]
    for name in COUNTED:
        lines += [f"# TYPE brisk_{name}_total counter", f"brisk_{name}_total {snapshot.counts[name]}"]
    lines += ["# TYPE brisk_waiting gauge"] + [f'brisk_waiting{{queue="{queue}"}} {n}'
                                                for queue, n in enumerate(snapshot.waiting_per_queue)]
    lines += ["# TYPE brisk_running gauge", f"brisk_running {snapshot.running}"]
    lines += histogram_lines("brisk_time_to_first_token_seconds", snapshot.time_to_first_token)
    lines += histogram_lines("brisk_inter_token_latency_seconds", snapshot.inter_token_latency)
    return "\n".join(lines) + "\n"
