"""Admission order of the waiting queue: bound, priority, weighted fair share, removal."""

import pytest

from vllm_layered.serving.engine.scheduler import FairQueue, QueueFullError, StepCandidate, pick_step_batch


def test_bound_is_enforced_and_nothing_is_half_added():
    q = FairQueue(max_size=2)
    q.push("a", tenant="t", cost=1)
    q.push("b", tenant="t", cost=1)
    with pytest.raises(QueueFullError, match="full"):
        q.push("c", tenant="t", cost=1)
    assert len(q) == 2 and "c" not in q
    assert [q.pop(), q.pop()] == ["a", "b"]


def test_flooding_tenant_does_not_starve_another():
    q = FairQueue(max_size=100)
    for i in range(50):
        q.push(f"flood{i}", tenant="flood", cost=10)
    for _ in range(3):  # the flood is being served
        q.pop()
    q.push("polite", tenant="polite", cost=10)
    order = q.ordered()
    assert order.index("polite") <= 1  # goes ahead of the flood's backlog


def test_weights_share_admissions_proportionally():
    q = FairQueue(max_size=1000, weights={"gold": 3.0, "free": 1.0})
    for i in range(100):
        q.push(("gold", i), tenant="gold", cost=1)
        q.push(("free", i), tenant="free", cost=1)
    first = [q.pop()[0] for _ in range(40)]
    assert first.count("gold") == 30 and first.count("free") == 10


def test_priority_goes_first_and_fifo_within_a_tenant():
    q = FairQueue(max_size=10)
    q.push("low1", tenant="t", cost=1)
    q.push("low2", tenant="t", cost=1)
    q.push("urgent", tenant="u", cost=100, priority=5)
    assert q.ordered() == ["urgent", "low1", "low2"]


def test_remove_and_peek_skip_removed_entries():
    q = FairQueue(max_size=10)
    for name in "abc":
        q.push(name, tenant="t", cost=1)
    assert q.remove("a") and not q.remove("a")
    assert q.peek() == "b" and len(q) == 2
    assert q.ordered() == ["b", "c"]


def candidate(name, *, remaining, tokens=10, priority=0, paused=0.0, arrival=0.0):
    return StepCandidate(name, priority, remaining, tokens, paused, arrival)


def test_step_batch_runs_least_remaining_work_first_within_the_budget():
    running = [candidate("long", remaining=900), candidate("short", remaining=100), candidate("mid", remaining=400)]
    assert pick_step_batch(running, token_budget=10, aging_s=30) == ["short"]
    assert pick_step_batch(running, token_budget=25, aging_s=30) == ["short", "mid"]
    # one request over the budget still runs (alone); smaller ones fill what is left
    big = [candidate("huge", remaining=50, tokens=40), candidate("small", remaining=80, tokens=5)]
    assert pick_step_batch(big, token_budget=30, aging_s=30) == ["huge"]
    assert pick_step_batch(big[::-1], token_budget=45, aging_s=30) == ["huge", "small"]


def test_step_batch_priority_first_and_aging_prevents_starvation():
    running = [candidate("short", remaining=100), candidate("urgent-long", remaining=900, priority=1)]
    assert pick_step_batch(running, token_budget=10, aging_s=30) == ["urgent-long"]
    fresh_short = candidate("short", remaining=100)
    assert pick_step_batch([fresh_short, candidate("long", remaining=900, paused=60)], 10, 30) == ["short"]
    assert pick_step_batch([fresh_short, candidate("long", remaining=900, paused=300)], 10, 30) == ["long"]


def test_step_batch_first_come_first_served_order():
    """fcfs: the earliest submitted steps first however much work it has left; priority still comes first."""
    running = [candidate("late-short", remaining=100, arrival=5.0), candidate("early-long", remaining=900, arrival=1.0),
               candidate("mid", remaining=400, arrival=3.0)]
    assert pick_step_batch(running, 10, 30, "fcfs") == ["early-long"]
    assert pick_step_batch(running, 25, 30, "fcfs") == ["early-long", "mid"]
    assert pick_step_batch(running, 10, 30, "srpt") == ["late-short"]
    urgent = candidate("urgent", remaining=900, priority=1, arrival=9.0)
    assert pick_step_batch([*running, urgent], 10, 30, "fcfs") == ["urgent"]
    with pytest.raises(ValueError, match="unknown step order"):
        pick_step_batch(running, 10, 30, "lifo")
