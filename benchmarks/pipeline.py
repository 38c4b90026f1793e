"""A model of the offload store's copy pipeline: the cycle time its schedule allows, given each step's compute.

A third lower bound next to paired.py's two (a one-step lead, and a lead as long as needed): what the
store as built can reach with perfect overlap, from the resident step times (compute), the bytes of
each group and the copy rates measured with both directions busy. It follows the store's rules:

- step s trains group g_s; its update waits until g_s's copy-in has landed (the rest of the step does
  not), so the step ends at max(start + compute_s, copy-in done);
- the copy home of g_s starts when step s+1 starts (held back to the next forward's first block) and
  runs on the device-to-host queue, one chunk after the other;
- with ``slots`` slots, group g_s goes to the slot g_{s - slots} held; with a lookahead as long as the
  slots (the optimizer prefetches one upcoming group per slot) its copy-in is queued when that group's
  copy home is (the start of step s - slots + 1), otherwise at the end of step s - lookahead; on the
  host-to-device queue each chunk waits for the same chunk of the slot's last copy home;
- ``chunk_bytes`` None moves whole groups (the store before chunking).

Consecutive groups are taken to be distinct (bottom2up/top2down; a group that follows itself needs no
copy). Three cycles are run and the last one reported: the steady state.
"""
from __future__ import annotations

import math
from typing import Sequence


def pipeline_cycle(order: Sequence[int], compute_ms: Sequence[float], group_bytes: Sequence[float], bw: dict,
                   slots: int, chunk_bytes: float | None = None, lookahead: int | None = None,
                   cycles: int = 3) -> dict:
    """{"cycle_ms", "step_ms"} of the last of ``cycles`` cycles of ``order`` (``compute_ms`` per step of it)."""
    lead = slots if lookahead is None else lookahead
    if not 1 <= lead <= slots:
        raise ValueError(f"lookahead must be 1..slots ({slots}), got {lead}")
    h2d, d2h = bw["h2d_both_gbps"] * 1e6, bw["d2h_both_gbps"] * 1e6  # bytes per ms, both directions busy
    k, n = len(order), len(order) * cycles
    group = [order[i % k] for i in range(n)]

    def chunks(nbytes: float) -> list[float]:
        if not chunk_bytes:
            return [nbytes]
        return [min(chunk_bytes, nbytes - c * chunk_bytes) for c in range(math.ceil(nbytes / chunk_bytes))]

    start, end = [0.0] * (n + 1), [0.0] * n
    d2h_free = h2d_free = 0.0
    read: list[dict[int, float]] = [{} for _ in range(slots)]  # per slot, chunk -> when its last copy home ended
    landed = {s: -math.inf for s in range(min(slots, n))}  # the first groups start in their slots
    for s in range(n):
        if s:  # the copy home of the group before starts with this step
            d2h_free = max(d2h_free, start[s])
            for c, nbytes in enumerate(chunks(group_bytes[group[s - 1]])):
                d2h_free += nbytes / d2h
                read[(s - 1) % slots][c] = d2h_free
        for j in range(s, min(n, s + slots)):  # copy-ins whose queueing time is known by now
            if j in landed or j - lead >= s or j - slots + 1 > s:
                continue
            queued = max(end[j - lead] if j >= lead else 0.0, start[j - slots + 1] if j >= slots - 1 else 0.0)
            h2d_free = max(h2d_free, queued)
            for c, nbytes in enumerate(chunks(group_bytes[group[j]])):
                h2d_free = max(h2d_free, read[j % slots].get(c, -math.inf)) + nbytes / h2d
            landed[j] = h2d_free
        end[s] = max(start[s] + compute_ms[s % k], landed[s])
        start[s + 1] = end[s]
    steps = [end[i] - start[i] for i in range(n - k, n)]
    return {"cycle_ms": sum(steps), "step_ms": steps}
