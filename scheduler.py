"""Who runs next: the policy the serving engine (engine.py) asks before each step which waiting requests take
the KV cache's free rows and which running ones give theirs up. Pure bookkeeping over the clock times it is given, so
that tests can drive it with a fake clock.

- `FirstComeFirstServed`: requests take free rows in the order they came and keep them to the end.
- `SkipJoinMLFQ`: FastServe's skip-join multi-level feedback queue (Wu et al. 2023, "Fast Distributed
  Inference Serving for Large Language Models"). Queue i has a quantum base * 2^i of running time. A new
  request joins the highest queue whose quantum is at least its prefill time (it skips the queues above, where
  its first iteration alone would use the quantum up); a request that has used its queue's quantum moves one
  queue down. The rows go to the highest queues, first come first served within a queue, and a running
  request is preempted (its KV rows set aside until a row is free again) when a request of a strictly
  higher queue waits and no row is free. Short requests so finish ahead of long ones they arrived behind,
  without knowing output lengths in advance; a request that waits longer than `starve_after` seconds goes
  back to the top queue, so none starves.
"""
import collections
import itertools
from dataclasses import dataclass


@dataclass
class Job:
    """The scheduler's record of a request: its queue, the running time it has used there, and since when it
    waits (None while it runs)."""
    request: object
    prompt_length: int
    order: int  # arrival order, first come first served within a queue
    queue: int = 0
    used: float = 0.0
    waiting_since: float = 0.0


class FirstComeFirstServed:
    """Free rows to the longest-waiting requests; no preemption."""

    queues = 1

    def __init__(self):
        self.jobs, self.arrivals = {}, itertools.count()

    def add(self, request, prompt_length: int, now: float):
        self.jobs[id(request)] = Job(request, prompt_length, next(self.arrivals), waiting_since=now)

    def remove(self, request):
        self.jobs.pop(id(request), None)

    def charge(self, running: list, seconds: float, now: float):
        """Running time of one iteration, spent by every request in `running`."""

    def priority(self, job: Job) -> tuple:
        return (job.order,)

    def waiting(self, now: float) -> list:
        """The requests without a row, in the order they should get one."""
        return [job.request for job in sorted((j for j in self.jobs.values() if j.waiting_since is not None),
                                              key=self.priority)]

    def waiting_per_queue(self) -> list:
        """How many requests wait in each queue (for /metrics)."""
        counts = collections.Counter(job.queue for job in self.jobs.values() if job.waiting_since is not None)
        return [counts[queue] for queue in range(self.queues)]

    def plan(self, running: list, free_rows: int, now: float) -> tuple:
        """(requests to preempt, requests to give a row to) for this iteration; running: the requests
        holding rows now."""
        join = self.waiting(now)[:free_rows]
        self.started(join)
        return [], join

    def started(self, requests: list):
        for request in requests:
            self.jobs[id(request)].waiting_since = None

    def preempted(self, requests: list, now: float):
        for request in requests:
            self.jobs[id(request)].waiting_since = now


class SkipJoinMLFQ(FirstComeFirstServed):
    """Skip-join MLFQ (module docstring). base_seconds: queue 0's quantum, about one decode step;
    prefill_seconds(prompt_length): the time a prompt's prefill takes, measured by the engine."""

    def __init__(self, base_seconds: float, prefill_seconds, queues: int = 6, starve_after: float = 30.0):
        super().__init__()
        self.quanta, self.queues = [base_seconds * 2 ** i for i in range(queues)], queues
        self.prefill_seconds, self.starve_after = prefill_seconds, starve_after

    def add(self, request, prompt_length: int, now: float):
        super().add(request, prompt_length, now)
        prefill = self.prefill_seconds(prompt_length)
        # skip-join: the highest queue whose quantum covers the prefill (the lowest one if none does)
        self.jobs[id(request)].queue = next((i for i, quantum in enumerate(self.quanta) if quantum >= prefill),
                                            len(self.quanta) - 1)

    def charge(self, running: list, seconds: float, now: float):
        for request in running:
            job = self.jobs[id(request)]
            job.used += seconds
            if job.used >= self.quanta[job.queue] and job.queue < len(self.quanta) - 1:
                job.queue, job.used = job.queue + 1, 0.0  # demoted: a fresh quantum, twice as long

    def priority(self, job: Job) -> tuple:
        return job.queue, job.order

    def plan(self, running: list, free_rows: int, now: float) -> tuple:
        for job in self.jobs.values():  # the starvation guard
            if job.waiting_since is not None and now - job.waiting_since > self.starve_after:
                job.queue, job.used, job.waiting_since = 0, 0.0, now
        waiting = self.waiting(now)
        join, waiting = waiting[:free_rows], waiting[free_rows:]
        # lowest priority last: preempted first while a waiting request belongs to a strictly higher queue
        holding = sorted(running, key=lambda request: self.priority(self.jobs[id(request)]))
        preempt = []
        while waiting and holding and self.jobs[id(waiting[0])].queue < self.jobs[id(holding[-1])].queue:
            preempt.append(holding.pop())
            join.append(waiting.pop(0))
        self.preempted(preempt, now)
        self.started(join)
        return preempt, join
