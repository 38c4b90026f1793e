"""Host memory pinned at its exact size: one pageable allocation, page-locked with ``cudaHostRegister``.

torch's pinned allocator (``pin_memory=True``) rounds every block up to a power of two and caches it:
a LLaMA-2-7B layer's masters and Adam moments (772 MiB per kind) take 1 GiB each, so about 99 GiB
were pinned where the store holds 75.3 GiB. Host RAM is the next wall on a workstation with a 24 GB
card, so the store allocates every group's home buffers as one ordinary (pageable) tensor and
registers the pages it covers with the CUDA driver: the bytes pinned are the bytes held, rounded up
to whole pages.

Registered memory must stay allocated until it is unregistered, and must not be unregistered while
a copy still reads or writes it. The finalizer below holds the allocation, synchronizes the streams
that copy to and from it, unregisters it, and only then lets it go: views of it that outlive the
store (a checkpoint's tensors, say) keep valid, pageable, memory.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, as torch's own helper does


def page_round(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages (what registering them locks)."""
    return -(-nbytes // PAGE) * PAGE


def padded_numel(numel: int, element_size: int) -> int:
    """Elements to allocate so that a page-aligned run of ``numel`` elements, rounded up to whole pages, fits."""
    return numel + -(-2 * PAGE // element_size)


def pin_exact(raw: Tensor, numel: int, owner: object, streams: Sequence[Any]) -> tuple[Tensor, int]:
    """Page-lock ``numel`` elements of the CPU tensor ``raw`` (allocated with ``padded_numel``), starting at its
    first page boundary; returns (that run of elements, bytes pinned).

    The registration covers whole pages that lie inside ``raw`` only, so it never overlaps another
    allocation's registration. It is undone when ``owner`` is garbage collected: ``streams`` (the ones
    that copy to and from this memory) are synchronized first, and ``raw`` stays alive until then.
    """
    size = raw.element_size()
    skip = (-raw.data_ptr()) % PAGE
    if skip % size:
        raise ValueError(f"host buffer at {raw.data_ptr():#x} is not aligned to its {size}-byte elements")
    run = raw[skip // size: skip // size + numel]
    nbytes = page_round(numel * size)
    if numel == 0:
        return run, 0
    if run.data_ptr() + nbytes > raw.data_ptr() + raw.numel() * size:
        raise ValueError("pin_exact needs a buffer from padded_numel: the last page would lie outside it")
    cudart = torch.cuda.cudart()
    status = int(cudart.cudaHostRegister(run.data_ptr(), nbytes, REGISTER_PORTABLE))
    if status != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of host memory failed with cudaError {status} "
                           "(pin_memory=false keeps the store in pageable memory)")
    # Not at interpreter exit: the process's pages go back to the system anyway, and CUDA may be gone.
    weakref.finalize(owner, _unpin, cudart.cudaHostUnregister, run.data_ptr(), raw, list(streams)).atexit = False
    return run, nbytes


def _unpin(unregister: Callable[[int], Any], ptr: int, raw: Tensor, streams: list) -> None:
    """Synchronize the copy streams, then unregister; ``raw`` (held until here) is freed after."""
    for stream in streams:
        stream.synchronize()  # no copy may be reading or writing these pages once they are unlocked
    status = int(unregister(ptr))
    if status != 0:
        logger.warning("cudaHostUnregister(%#x) failed with cudaError %d", ptr, status)
    del raw
