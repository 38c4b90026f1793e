"""Host memory a set-up takes and pins, from the process's and the system's own accounting (issue 25).

The offload store reports the bytes it page-locks (``memory_report()["state_host_pinned"]``); these
figures check that claim from outside: the system's available memory before and after a set-up is
built (what it really holds, pinned or not: torch's pinned allocator would hold each block rounded
up to a power of two), ``VmLck``/``VmPin`` of /proc/self/status (memory locked or pinned through the
kernel's accounting; the CUDA driver's page-locking may not show there), torch's pinned-allocator
statistics (none of the store's memory comes from it), and ``is_pinned()`` (the driver's answer) at
the first and last element of the store's host allocation.
"""
from __future__ import annotations

from typing import Any

import torch

TORCH_PINNED_KEYS = ("allocated_bytes.current", "num_host_alloc", "num_host_free")


def _kib_fields(path: str, keys: tuple[str, ...]) -> dict[str, int | None]:
    out: dict[str, int | None] = dict.fromkeys(keys)
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in out:
                    out[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def snapshot() -> dict[str, Any]:
    """Bytes: the system's MemAvailable; this process's VmRSS, VmLck, VmPin; torch's pinned-allocator stats."""
    out: dict[str, Any] = _kib_fields("/proc/meminfo", ("MemAvailable",))
    out.update(_kib_fields("/proc/self/status", ("VmRSS", "VmLck", "VmPin")))
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if torch.cuda.is_available() and stats is not None:
        try:
            out["torch_pinned"] = {k: v for k, v in stats().items() if k in TORCH_PINNED_KEYS}
        except (RuntimeError, AttributeError):
            pass
    return out


def delta(before: dict, after: dict) -> dict[str, Any]:
    """after - before for every figure both have (the system's available memory as ``MemAvailable_drop``)."""
    out: dict[str, Any] = {}
    for k, a in after.items():
        b = before.get(k)
        if k == "torch_pinned" and isinstance(a, dict) and isinstance(b, dict):
            out[k] = {x: a[x] - b[x] for x in a if x in b}
        elif isinstance(a, int) and isinstance(b, int):
            out["MemAvailable_drop" if k == "MemAvailable" else k] = (b - a) if k == "MemAvailable" else a - b
    return out


def store_pinning(optimizer: Any) -> dict[str, Any] | None:
    """What an offloading HiFT optimizer's store holds and pins, and the driver's word on its first/last element."""
    store = getattr(optimizer, "store", None)
    if store is None or not store.offloaded:
        return None
    blocks = store._home_blocks
    state = sum(b.numel() * b.element_size() for b in blocks)
    out = {"state_bytes": state, "pinned_bytes": store.pinned_bytes,
           "reported_pinned": optimizer.memory_report()["state_host_pinned"],
           "pinned_over_state": store.pinned_bytes / state if state else None}
    ends = [t for t in (blocks[0][:1], blocks[-1][-1:]) if t.numel()]
    if torch.cuda.is_available() and ends:
        out["driver_says_pinned"] = [bool(t.is_pinned()) for t in ends]
    return out


def format_pinning(name: str, pin: dict | None, build: dict | None) -> str:
    """One line: the store's pinned bytes against its state, and the accounting around the build."""
    gib = lambda x: "-" if x is None else f"{x / 2 ** 30:.2f}"  # noqa: E731
    parts = [f"  host memory of {name}:"]
    if pin:
        parts.append(f"state {gib(pin['state_bytes'])} GiB, pinned {gib(pin['pinned_bytes'])} GiB "
                     f"({pin['pinned_over_state']:.4f}x the state; memory_report {gib(pin['reported_pinned'])}), "
                     f"is_pinned first/last {pin.get('driver_says_pinned', '-')};")
    if build:
        tp = build.get("torch_pinned")
        parts.append(f"over its build: MemAvailable -{gib(build.get('MemAvailable_drop'))} GiB, VmRSS "
                     f"+{gib(build.get('VmRSS'))}, VmLck +{gib(build.get('VmLck'))}, VmPin +{gib(build.get('VmPin'))} "
                     f"GiB, torch pinned allocator {tp if tp is not None else '-'}")
    return " ".join(parts)
