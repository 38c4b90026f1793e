"""One-process paired timing of training set-ups (``offload.py --paired``; issue 25).

Timing across processes is noisier than the gaps chased here (the same fpft set-up measured 99.6,
83.7 and 75.1 ms/step in three processes of one H200 call). So every set-up named (``hift_ds.profile.setups``:
e.g. hift-triton and hift-offload-triton, or the DeepSpeed engine set-ups ds-hift,
ds-hift-offload-synctimer, ds-hift-offload) is built in this one process on its own copy of the model
(same seed, same weights, uncapped unless --max-memory-gib) and trained on the same batches:

- one warm-up cycle each, then whole-cycle blocks in ABBA order (A B B A ...; three set-ups:
  A B C C B A), so that a slow drift of the machine falls on every set-up alike;
- each step timed by CUDA events on the compute stream, with no synchronize between the steps of a
  block (one at each block's end, to read the events); on a CPU by the host clock, labelled so;
- no NVML sampler thread and no profiler while timing; ``torch.cuda.memory_stats`` deltas (alloc
  retries, device allocs/frees, segments) and host page faults (getrusage) over each block;
- per pair of set-ups: the per-group paired differences (mean step time of a group in the second
  set-up minus the first) and the cycle ratio with its min/max over the k-th blocks of each;
- for an offloading set-up, two lower bounds of its cycle from the resident set-up's step times
  (compute_s) and the copies each step must hide (copy_s: the group before goes home, this step's
  group comes in; from its bytes and a pinned-copy probe, both directions at once on two slots or on
  one slot refilled in chunks, one after the other on one slot copying whole groups):
  sum_s max(compute_s, copy_s) (a one-step lead) and max(sum compute, sum copy) (a lead as long as
  needed);
- a third bound, the store's own pipeline modelled (``pipeline.py``: its slots, lookahead and chunks,
  with perfect overlap);
- host memory: each offloading set-up's pinned bytes against its state, and the system's and the
  process's accounting around its build (``hostmem.py``);
- optionally a second shape on the same model copies (``also``: e.g. 4x512 with gradient
  checkpointing), its own warm-up and ABBA blocks;
- then a separate, shorter traced run (torch.profiler) of one set-up, whose step time is compared
  with the untraced one of the same groups (a trace whose settings stretch the step is not evidence).
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import hostmem
from pipeline import pipeline_cycle
from hift_ds.profile import setups
from hift_ds.profile.setups import Built, Options

# torch.cuda.memory_stats counters whose change over a block says the allocator did work it should not
# in steady state (retries after a failed cudaMalloc, device frees, new segments).
MEMORY_KEYS = ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc", "num_device_free",
               "segment.all.allocated", "segment.all.freed")
HOST_KEYS = ("num_host_alloc", "num_host_free")  # torch.cuda.host_memory_stats (pinned), where torch has it
TRACE_TOLERANCE = 0.10  # a traced step within 10% of the untraced one
CUDA_CLOCK = "CUDA events on the compute stream"
CPU_CLOCK = "host wall clock (CPU run: no CUDA events; says nothing about a GPU pipeline)"


# ---- pure report logic (tested in tests/test_benchmarks.py) -------------------------------------
def block_order(names: Sequence[str], blocks: int) -> list[str]:
    """``blocks`` blocks per set-up, rounds alternately forward and reversed: A B B A A B ... (ABBA)."""
    out: list[str] = []
    for r in range(blocks):
        out += list(names) if r % 2 == 0 else list(reversed(names))
    return out


def mean_by_group(blocks: list[dict]) -> dict[int, float]:
    """Mean step ms per group over ``blocks`` (each with parallel "groups" and "step_ms" lists)."""
    acc: dict[int, list[float]] = {}
    for b in blocks:
        for g, ms in zip(b["groups"], b["step_ms"]):
            acc.setdefault(g, []).append(ms)
    return {g: statistics.fmean(v) for g, v in sorted(acc.items())}


def paired_differences(base: list[dict], other: list[dict]) -> dict[int, float]:
    """Per group measured in both: mean step ms in ``other``'s blocks minus that in ``base``'s."""
    a, b = mean_by_group(base), mean_by_group(other)
    return {g: b[g] - a[g] for g in a if g in b}


def cycle_ratio(base_cycles: Sequence[float], other_cycles: Sequence[float]) -> dict:
    """other / base on the cycle: the ratio of the means, and median/min/max over the k-th block of each."""
    per = [o / b for b, o in zip(base_cycles, other_cycles)]
    return {"ratio": statistics.fmean(other_cycles) / statistics.fmean(base_cycles), "median": statistics.median(per),
            "min": min(per), "max": max(per), "per_block": per}


def copy_ms(out_bytes: float, in_bytes: float, bw: dict, concurrent: bool) -> float:
    """One step's copies: ``out_bytes`` home and ``in_bytes`` in. Two slots run them at once (each direction
    at its rate with both running), one slot one after the other (each at its rate alone). GB/s = 1e6 B/ms."""
    if concurrent:
        return max(out_bytes / (bw["d2h_both_gbps"] * 1e6), in_bytes / (bw["h2d_both_gbps"] * 1e6))
    return out_bytes / (bw["d2h_gbps"] * 1e6) + in_bytes / (bw["h2d_gbps"] * 1e6)


def step_copies(order: Sequence[int], group_bytes: Sequence[int], bw: dict, concurrent: bool) -> list[float]:
    """copy_s for each step s of a cycle trained in ``order``: the group before it (cyclically: the last of
    the previous cycle) goes home and step s's group comes in. That is what the store runs under step s:
    the copy-in is queued after the previous update, the copy-out starts at step s's first block."""
    return [copy_ms(group_bytes[order[i - 1]], group_bytes[order[i]], bw, concurrent) for i in range(len(order))]


def lower_bounds(compute: Sequence[float], copies: Sequence[float]) -> dict:
    """Cycle lower bounds of an offloading set-up: each step hides its own copies (a one-step lead), or the
    copies move freely across the cycle (a longer lead)."""
    return {"one_step_lead_ms": sum(max(c, k) for c, k in zip(compute, copies)),
            "long_lead_ms": max(sum(compute), sum(copies)), "compute_ms": sum(compute), "copy_ms": sum(copies),
            "steps_copy_bound": sum(k > c for c, k in zip(compute, copies))}


def counter_delta(before: dict | None, after: dict | None, keys: Sequence[str]) -> dict | None:
    """after[k] - before[k] for the ``keys`` both have (None without figures: no CUDA)."""
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in keys if k in before and k in after}


def trace_ratio(traced: dict[int, float], untraced: dict[int, float]) -> dict:
    """Traced over untraced step time on the same groups (sums over the groups both have)."""
    common = [g for g in traced if g in untraced]
    if not common:
        return {"ratio": None, "groups": [], "within": None}
    r = sum(traced[g] for g in common) / sum(untraced[g] for g in common)
    return {"ratio": r, "groups": common, "within": abs(r - 1) <= TRACE_TOLERANCE, "tolerance": TRACE_TOLERANCE}


def summarize(names: Sequence[str], blocks: dict[str, list[dict]], info: dict[str, dict], bw: dict | None) -> dict:
    """The report from the measured blocks: per set-up cycles; per pair cycle ratio and per-group differences;
    per offloading set-up its lower bounds from the first resident set-up's step times."""
    out: dict = {"setups": {}, "pairs": [], "bounds": {}}
    for n in names:
        cycles = [b["cycle_ms"] for b in blocks[n]]
        out["setups"][n] = {"cycle_ms": cycles, "cycle_mean_ms": statistics.fmean(cycles), "cycle_min_ms": min(cycles),
                            "cycle_max_ms": max(cycles), "step_ms_by_group": mean_by_group(blocks[n])}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = paired_differences(blocks[a], blocks[b])
            worst = sorted(diff, key=lambda g: -diff[g])[:5]
            out["pairs"].append({"base": a, "other": b, "offload_vs_resident": bool(info[b].get("offload"))
                                 and not info[a].get("offload"), **cycle_ratio(out["setups"][a]["cycle_ms"],
                                                                      out["setups"][b]["cycle_ms"]),
                                 "group_diff_ms": diff, "diff_sum_ms": sum(diff.values()),
                                 "groups_slower": sum(d > 0 for d in diff.values()), "worst_groups": worst})
    resident = next((n for n in names if not info[n].get("offload")), None)
    for n in names:
        if not info[n].get("offload") or resident is None or not bw or not info[n].get("group_bytes"):
            continue
        order = blocks[n][0]["groups"]
        compute_by_group = out["setups"][resident]["step_ms_by_group"]
        if any(g not in compute_by_group for g in order):
            continue
        compute = [compute_by_group[g] for g in order]
        # Two slots copy both directions at once; so does one slot refilled in chunks behind its copy home.
        chunk = info[n].get("chunk_bytes")
        concurrent = info[n].get("slots", 2) >= 2 or bool(chunk and chunk < max(info[n]["group_bytes"]))
        copies = step_copies(order, info[n]["group_bytes"], bw, concurrent=concurrent)
        lb = lower_bounds(compute, copies)
        cycle = out["setups"][n]["cycle_mean_ms"]
        slots = info[n].get("slots", 2)
        model = pipeline_cycle(order, compute, info[n]["group_bytes"], bw, slots, info[n].get("chunk_bytes"),
                               info[n].get("lookahead") or slots)["cycle_ms"]
        out["bounds"][n] = {**lb, "resident": resident, "order": list(order), "compute_s_ms": compute,
                            "copy_s_ms": copies, "cycle_ms": cycle, "pipeline_ms": model,
                            "over_one_step_lead": cycle / lb["one_step_lead_ms"],
                            "over_long_lead": cycle / lb["long_lead_ms"], "over_pipeline": cycle / model,
                            "resident_cycle_ms": out["setups"][resident]["cycle_mean_ms"]}
    return out


def format_report(summary: dict, clock: str) -> str:
    """The summary in words: cycles, pairs, bounds (the full per-group lists are in the JSON)."""
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [f"paired timing ({clock}):"]
    for n, s in summary["setups"].items():
        lines.append(f"  {n:<28} cycle {f(s['cycle_mean_ms'])} ms (min {f(s['cycle_min_ms'])}, max "
                     f"{f(s['cycle_max_ms'])}; blocks {', '.join(f(c) for c in s['cycle_ms'])})")
    for p in summary["pairs"]:
        worst = ", ".join(f"g{g} {p['group_diff_ms'][g]:+.2f}" for g in p["worst_groups"])
        lines.append(f"  {p['other']} / {p['base']}: cycle {p['ratio']:.3f}x (blocks {p['min']:.3f}-{p['max']:.3f}, "
                     f"median {p.get('median', p['ratio']):.3f}); "
                     f"per-group paired difference sums to {p['diff_sum_ms']:+.1f} ms, {p['groups_slower']} of "
                     f"{len(p['group_diff_ms'])} groups slower; largest: {worst}")
    for n, b in summary["bounds"].items():
        lines.append(f"  bounds of {n} (compute_s from {b['resident']}, copy_s from bytes and the probe): one-step "
                     f"lead sum max(compute, copy) {f(b['one_step_lead_ms'])} ms, longer lead max(sum compute "
                     f"{f(b['compute_ms'])}, sum copy {f(b['copy_ms'])}) {f(b['long_lead_ms'])} ms; "
                     f"{b['steps_copy_bound']} of {len(b['order'])} steps copy-bound; this store's pipeline modelled "
                     f"{f(b.get('pipeline_ms'))} ms; cycle {f(b['cycle_ms'])} ms = {b['over_one_step_lead']:.3f}x / "
                     f"{b['over_long_lead']:.3f}x / {b.get('over_pipeline', math.nan):.3f}x the bounds")
    return "\n".join(lines)


# (set-up pair, limit) targets of issue 25 on the cycle: offload <= 1.05x resident (the 1.1B shape, bare optimizer
# and DeepSpeed engine); an offloaded cycle <= 1.10x max(sum compute, sum copy) (the 7B shape under a 24 GiB cap).
PAIR_LIMIT = 1.05
BOUND_LIMIT = 1.10


def format_targets(summary: dict) -> str:
    """Issue 25's cycle targets against this run's figures (an uncapped run only rehearses the 7B one)."""
    lines = ["targets, from this run's measurements:"]
    for p in (p for p in summary["pairs"] if p["offload_vs_resident"]):
        verdict = "PASS" if p["ratio"] <= PAIR_LIMIT else "FAIL"
        lines.append(f"  {verdict:<5} cycle {p['other']} <= {PAIR_LIMIT:g} x {p['base']}: {p['ratio']:.3f}x")
    for n, b in summary["bounds"].items():
        verdict = "PASS" if b["over_long_lead"] <= BOUND_LIMIT else "FAIL"
        lines.append(f"  {verdict:<5} cycle {n} <= {BOUND_LIMIT:g} x max(sum compute, sum copy): "
                     f"{b['over_long_lead']:.3f}x")
    return "\n".join(lines)


# ---- measuring -----------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _memory_stats(dev: torch.device) -> dict | None:
    return torch.cuda.memory_stats(dev) if dev.type == "cuda" else None


def _host_stats(dev: torch.device) -> dict | None:
    stats = getattr(torch.cuda, "host_memory_stats", None)  # pinned allocations; not in every torch
    if dev.type != "cuda" or stats is None:
        return None
    try:
        return dict(stats())
    except (RuntimeError, AttributeError):
        return None


def _faults() -> tuple[int, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_majflt


def active_group(built: Built, position: int) -> int:
    """The group the next step trains (HiFT optimizers), else the step's position in the cycle."""
    g = getattr(built.optimizer, "active_group", None)
    return position if g is None else int(g)


def run_block(built: Built, batches: Sequence[torch.Tensor], dev: torch.device,
              on_step: Callable[[], None] | None = None) -> dict:
    """Train one step per batch, each timed on the compute stream (host clock on a CPU), with a synchronize
    only after the last; the block's record (step ms, groups, memory/host counters, losses finite)."""
    cuda = dev.type == "cuda"
    marks: list = []
    groups, losses = [], []
    mem0, host0, faults0 = _memory_stats(dev), _host_stats(dev), _faults()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()

    def mark() -> None:
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()  # the current (compute) stream: what is between two marks is that stream's step
            marks.append(ev)
        else:
            marks.append(time.perf_counter())
    for i, ids in enumerate(batches):
        groups.append(active_group(built, i))
        mark()
        losses.append(built.train_step(ids))  # left on the device: reading it would synchronize
        if on_step is not None:
            on_step()
    mark()
    _sync(dev)
    wall = (time.perf_counter() - t0) * 1e3
    step_ms = ([a.elapsed_time(b) for a, b in zip(marks, marks[1:])] if cuda
               else [(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
    faults1 = _faults()
    return {"step_ms": step_ms, "groups": groups, "cycle_ms": sum(step_ms), "wall_ms": wall,
            "memory": counter_delta(mem0, _memory_stats(dev), MEMORY_KEYS),
            "host_memory": counter_delta(host0, _host_stats(dev), HOST_KEYS),
            "peak_alloc_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None,
            "minflt": faults1[0] - faults0[0], "majflt": faults1[1] - faults0[1],
            "losses_finite": all(math.isfinite(float(x)) for x in losses)}


def probe_bandwidth(gib: float, dev: torch.device) -> dict:
    """Pinned host <-> device copy rates in GB/s: each direction alone, then both at once on two streams
    (each direction timed by events on its own stream); median of 5 rounds after one. On a CPU, host
    memcpy stands in (labelled)."""
    n = max(int(gib * 2 ** 30) // 4, 1)
    nbytes = n * 4
    if dev.type != "cuda":
        a, b = torch.ones(n), torch.empty(n)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            b.copy_(a)
            times.append((time.perf_counter() - t0) * 1e3)
        rate = nbytes / statistics.median(times[1:]) / 1e6
        return {"h2d_gbps": rate, "d2h_gbps": rate, "h2d_both_gbps": rate / 2, "d2h_both_gbps": rate / 2,
                "both_gbps_each_way": rate / 2, "bytes": nbytes, "what": "host memcpy stand-in (no GPU)"}
    host_in = torch.ones(n, pin_memory=True)
    host_out = torch.empty(n, pin_memory=True)
    dev_in, dev_out = torch.empty(n, device=dev), torch.ones(n, device=dev)
    streams = {"h2d": torch.cuda.Stream(dev), "d2h": torch.cuda.Stream(dev)}
    pairs = {"h2d": (dev_in, host_in), "d2h": (host_out, dev_out)}

    def one_round(directions: tuple[str, ...]) -> dict[str, float]:
        torch.cuda.synchronize(dev)
        t0, evs = time.perf_counter(), {}
        for d in directions:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(streams[d]):
                e0.record()
                pairs[d][0].copy_(pairs[d][1], non_blocking=True)
                e1.record()
            evs[d] = (e0, e1)
        torch.cuda.synchronize(dev)
        out = {d: e0.elapsed_time(e1) for d, (e0, e1) in evs.items()}
        out["wall"] = (time.perf_counter() - t0) * 1e3
        return out

    def rates(directions: tuple[str, ...]) -> dict[str, float]:
        rounds = [one_round(directions) for _ in range(6)][1:]
        return {k: nbytes / statistics.median(r[k] for r in rounds) / 1e6 for k in rounds[0]}
    alone_in, alone_out, both = rates(("h2d",)), rates(("d2h",)), rates(("h2d", "d2h"))
    del host_in, host_out, dev_in, dev_out
    torch.cuda.empty_cache()
    empty_host = getattr(torch._C, "_host_emptyCache", None)  # give the probe's pinned blocks back
    if empty_host is not None:
        empty_host()
    return {"h2d_gbps": alone_in["h2d"], "d2h_gbps": alone_out["d2h"], "h2d_both_gbps": both["h2d"],
            "d2h_both_gbps": both["d2h"], "both_gbps_each_way": both["wall"], "bytes": nbytes,
            "what": "pinned copies, CUDA events per stream"}


def _info(name: str, built: Built) -> dict:
    store = getattr(built.optimizer, "store", None)
    out = {"notes": list(built.notes), "offload": bool(store is not None and store.offloaded),
           "num_groups": getattr(built.optimizer, "num_groups", None)}
    if store is not None:
        out["group_bytes"] = [sum(t.numel() * t.element_size() for t in bufs.values()) for bufs in store.home]
        out["slots"] = len(store.slots)
        out["chunk_bytes"] = getattr(store, "chunk", 0) * 4 or None
        out["lookahead"] = getattr(store, "lookahead", None)
        out["pinning"] = hostmem.store_pinning(built.optimizer)
    engine_timer = getattr(built, "engine", None)
    if engine_timer is not None:
        out["deepspeed_timer_synchronized"] = bool(engine_timer.tput_timer.config.synchronized)
    return out


def traced_run(name: str, built: Built, batches: Sequence[torch.Tensor], dev: torch.device, steps: int,
               trace_dir: str, tag: str, cpu_ops: bool = False) -> dict:
    """``steps`` steps of ``name`` under torch.profiler (after one profiler warm-up step), each timed as in the
    blocks; the chrome trace (gzipped) and its overlap summary. On CUDA only the device activity is
    recorded (kernels, copies and the CUDA runtime calls, which show what blocks the host) unless
    ``cpu_ops``: recording every operator on the host can stretch a launch-bound step."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from traces import overlap_summary, save_trace

    cuda = dev.type == "cuda"
    activities = ([ProfilerActivity.CPU] if cpu_ops or not cuda else []) + ([ProfilerActivity.CUDA] if cuda else [])
    path = Path(trace_dir) / f"{name}-{tag}.json"
    saved: dict = {}

    def ready(prof) -> None:
        saved["events"] = save_trace(prof, path)
    # No shapes, stacks or memory records: the least the profiler can add to a step.
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=ready) as p:
        rec = run_block(built, batches[:steps + 1], dev, on_step=p.step)
    timed = dict(zip(rec["groups"][1:], rec["step_ms"][1:]))  # the first step ran under the profiler's warm-up
    summary = overlap_summary(saved.get("events", []))
    return {"setup": name, "path": str(path.with_suffix(".json.gz")), "steps": steps, "mode": name,
            "activities": [str(a).rsplit(".", 1)[-1] for a in activities], "step_ms_by_group": timed, **summary}


def timed_blocks(names: Sequence[str], built: dict[str, Built], batches: Sequence[torch.Tensor], blocks: int,
                 info: dict, bw: dict | None, log: Callable[[str], None], out: dict) -> dict:
    """A warm-up cycle of each set-up, then ``blocks`` whole-cycle blocks each in ABBA order; ``out`` gets the
    blocks (filled in as measured: a run cut short keeps them), the window's counters and the summary."""
    dev = setups.device()
    for n in names:  # one whole cycle each: kernels compiled, allocator warm, every group's state touched
        rec = run_block(built[n], batches, dev)
        log(f"  warm-up cycle {n}: {rec['cycle_ms']:.1f} ms")
    order = block_order(names, blocks)
    out["blocks"] = {n: [] for n in names}
    mem0, faults0 = _memory_stats(dev), _faults()
    for i, n in enumerate(order):
        rec = run_block(built[n], batches, dev)
        rec["position"] = i
        out["blocks"][n].append(rec)
        m = rec["memory"] or {}
        log(f"  block {i + 1}/{len(order)} {n}: cycle {rec['cycle_ms']:.1f} ms over {len(batches)} steps (wall "
            f"{rec['wall_ms']:.1f}), median step {statistics.median(rec['step_ms']):.2f} ms; alloc retries "
            f"+{m.get('num_alloc_retries', '-')}, device frees +{m.get('num_device_free', '-')}, page faults "
            f"+{rec['minflt']}/+{rec['majflt']}" + ("" if rec["losses_finite"] else "; NON-FINITE LOSS"))
    faults1 = _faults()
    out["window"] = {"memory": counter_delta(mem0, _memory_stats(dev), MEMORY_KEYS),
                     "minflt": faults1[0] - faults0[0], "majflt": faults1[1] - faults0[1]}
    out["summary"] = summarize(names, out["blocks"], info, bw)
    return out


def measure(names: Sequence[str], o: Options, blocks: int, probe_gib: float, trace_dir: str | None = None,
            trace_steps: int = 4, trace_setup: str | None = None, command: str = "", result: dict | None = None,
            log: Callable[[str], None] = print, trace_cpu_ops: bool = False,
            also: tuple[int, int, bool, int] | None = None) -> dict:
    """Build every set-up here, time them in ABBA blocks of whole cycles, trace one; then, with ``also`` = (batch
    size, sequence length, gradient checkpointing, blocks), the same models at that shape. The result, filled
    into ``result`` as it is measured, and printed as measured (a run cut short keeps what it printed)."""
    from hift_ds.activations import enable_gradient_checkpointing
    from hift_ds.profile.presets import random_batch

    dev = setups.device()
    clock = CUDA_CLOCK if dev.type == "cuda" else CPU_CLOCK
    result = {} if result is None else result
    result.update({"command": command, "options": vars(o), "setups": list(names), "blocks_per_setup": blocks,
                   "clock": clock, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"})
    log(f"paired: {', '.join(names)} in one process on {result['device']}; {clock}; {command}")
    bw = probe_bandwidth(probe_gib, dev)
    result["bandwidth"] = bw
    log(f"  copy probe ({bw['what']}, {bw['bytes'] / 2 ** 30:.2f} GiB): H2D {bw['h2d_gbps']:.1f} GB/s, D2H "
        f"{bw['d2h_gbps']:.1f}, both at once H2D {bw['h2d_both_gbps']:.1f} + D2H {bw['d2h_both_gbps']:.1f}")
    built, info = {}, {}
    for n in names:
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        host0 = hostmem.snapshot()
        t0 = time.perf_counter()
        built[n] = setups.build(n, o, dev)
        info[n] = _info(n, built[n]) | {"build_s": time.perf_counter() - t0, "command": command,
                                        "host_over_build": hostmem.delta(host0, hostmem.snapshot())}
        if dev.type == "cuda":
            info[n]["device_gib"] = (torch.cuda.memory_allocated(dev) - before) / 2 ** 30
        log(f"  built {n}: {'; '.join(info[n]['notes'])} ({info[n]['build_s']:.1f} s"
            + (f", {info[n]['device_gib']:.2f} GiB on the device" if "device_gib" in info[n] else "") + ")")
        if info[n].get("pinning"):
            log(hostmem.format_pinning(n, info[n]["pinning"], info[n]["host_over_build"]))
    result["info"] = info
    ks = {info[n]["num_groups"] for n in names if info[n]["num_groups"]}
    if len(ks) != 1:
        raise ValueError(f"the set-ups' cycles differ or are unknown ({ks}): pair set-ups with one group count")
    k = ks.pop()
    vocab = built[names[0]].model.config.vocab_size
    batches = [random_batch(vocab, o.batch_size, o.seq_len, i, dev) for i in range(k)]
    timed_blocks(names, built, batches, blocks, info, bw, log, result)
    log(format_report(result["summary"], clock))
    if trace_dir and trace_steps > 0:
        who = trace_setup or next((n for n in reversed(names) if info[n]["offload"]), names[-1])
        tr = traced_run(who, built[who], batches, dev, min(trace_steps, k - 1), trace_dir,
                        f"{o.model}-{o.batch_size}x{o.seq_len}", trace_cpu_ops)
        tr["vs_untraced"] = trace_ratio(tr["step_ms_by_group"], result["summary"]["setups"][who]["step_ms_by_group"])
        result["trace"] = tr
        v = tr["vs_untraced"]
        log(f"  traced run of {who} ({'+'.join(tr['activities'])}): {tr['steps']} steps, traced/untraced step time "
            "on the same groups "
            + ("-" if v["ratio"] is None else f"{v['ratio']:.3f}x ({'within' if v['within'] else 'NOT within'} "
                                              f"{TRACE_TOLERANCE:.0%})") + f"; trace {tr['path']}")
    if also:
        bsz, seq, ckpt, also_blocks = also
        label = f"{bsz}x{seq}" + (" with gradient checkpointing" if ckpt else "")
        log(f"paired, second shape: {label}, the same model copies")
        if ckpt:
            for n in names:
                enable_gradient_checkpointing(built[n].model)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        batches = [random_batch(vocab, bsz, seq, i, dev) for i in range(k)]
        result["also"] = {"shape": label, "batch_size": bsz, "seq_len": seq, "gradient_checkpointing": ckpt}
        timed_blocks(names, built, batches, also_blocks, info, bw, log, result["also"])
        log(format_report(result["also"]["summary"], f"{clock}; {label}"))
    return result
