"""The schedulers on a fake clock: skip-join placement, demotion, preemption order, first come first served
within a queue, and the starvation guard of FastServe's MLFQ; first come first served never preempts."""
from scheduler import FirstComeFirstServed, SkipJoinMLFQ


def mlfq(starve_after=30.0):
    # quanta 1, 2, 4, 8 s; a prompt's prefill takes 10 ms a token
    return SkipJoinMLFQ(base_seconds=1.0, prefill_seconds=lambda length: 0.01 * length, queues=4,
                        starve_after=starve_after)


def test_a_new_request_joins_the_highest_queue_whose_quantum_covers_its_prefill():
    scheduler = mlfq()
    for name, length in (("short", 50), ("exact", 200), ("long", 300), ("huge", 5000)):
        scheduler.add(name, length, now=0.0)
    assert [scheduler.jobs[id(name)].queue for name in ("short", "exact", "long", "huge")] == [0, 1, 2, 3]


def test_a_request_that_used_its_quantum_moves_one_queue_down_with_a_fresh_one():
    scheduler = mlfq()
    scheduler.add("job", 10, now=0.0)
    scheduler.plan([], free_rows=1, now=0.0)
    scheduler.charge(["job"], 0.6, now=0.6)
    assert (scheduler.jobs[id("job")].queue, scheduler.jobs[id("job")].used) == (0, 0.6)
    scheduler.charge(["job"], 0.6, now=1.2)
    assert (scheduler.jobs[id("job")].queue, scheduler.jobs[id("job")].used) == (1, 0.0)
    for now in range(2, 20):
        scheduler.charge(["job"], 1.0, now=now)
    assert scheduler.jobs[id("job")].queue == 3  # the last queue keeps it


def test_the_lowest_priority_running_request_is_preempted_for_a_strictly_higher_one():
    scheduler = mlfq()
    scheduler.add("a", 300, now=0.0)  # queue 2
    scheduler.add("b", 150, now=0.0)  # queue 1
    assert scheduler.plan([], free_rows=2, now=0.0) == ([], ["b", "a"])
    scheduler.add("c", 10, now=1.0)  # queue 0, no free slot
    assert scheduler.plan(["a", "b"], free_rows=0, now=1.0) == (["a"], ["c"])
    scheduler.add("d", 150, now=2.0)  # queue 1, as high as b but not higher: waits
    assert scheduler.plan(["b", "c"], free_rows=0, now=2.0) == ([], [])
    assert scheduler.waiting(now=2.0) == ["d", "a"]


def test_within_a_queue_the_first_to_come_is_the_first_served():
    scheduler = mlfq()
    for name in ("first", "second", "third"):
        scheduler.add(name, 10, now=0.0)
    assert scheduler.plan([], free_rows=2, now=0.0) == ([], ["first", "second"])


def test_a_request_waiting_too_long_goes_back_to_the_top_queue():
    scheduler = mlfq(starve_after=5.0)
    scheduler.add("long", 5000, now=0.0)  # queue 3
    scheduler.add("short", 10, now=0.0)  # queue 0
    assert scheduler.plan([], free_rows=1, now=0.0) == ([], ["short"])
    scheduler.charge(["short"], 3.0, now=3.0)  # demoted to queue 1
    assert scheduler.plan(["short"], free_rows=0, now=4.0) == ([], [])
    assert scheduler.plan(["short"], free_rows=0, now=6.0) == (["short"], ["long"])  # promoted, then preempts


def test_first_come_first_served_never_preempts():
    scheduler = FirstComeFirstServed()
    scheduler.add("long", 5000, now=0.0)
    assert scheduler.plan([], free_rows=1, now=0.0) == ([], ["long"])
    scheduler.add("short", 10, now=1.0)
    assert scheduler.plan(["long"], free_rows=0, now=1.0) == ([], [])
    scheduler.remove("long")
    assert scheduler.plan([], free_rows=1, now=2.0) == ([], ["short"])
