"""launch/train.py's command line, SIGKILLed in the middle of putting its new final/ in place (tests/test_reliability.py).

    python tests/_kill_in_swap.py exchange|aside [launch/train.py options ...]

``exchange``: killed right after the new final/ and the old one swapped names (one atomic step), before the
old one, now under the temporary name, is deleted. ``aside``: as on a system that cannot swap names, killed
after the old final/ was renamed aside and before the new one was renamed in, the one moment with no
final/, which the next run puts right. The kill is put in here, around hift_ds.atomic, so the product code
holds no test hook.
"""
from __future__ import annotations

import os
import signal
import sys


def kill_in_swap(point: str) -> None:
    """Make hift_ds.atomic SIGKILL this process at ``point`` of a folder replacement."""
    from hift_ds import atomic

    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if point == "exchange":
        exchange = atomic.exchange

        def exchange_then_die(a: str, b: str) -> bool:
            assert exchange(a, b), "this system cannot swap names: test the 'aside' point instead"
            die()
        atomic.exchange = exchange_then_die
    else:
        atomic.exchange = lambda a, b: False  # a kernel or filesystem without renameat2's RENAME_EXCHANGE
        rename = os.rename

        def rename_then_die(a: str, b: str) -> None:
            rename(a, b)
            if b.endswith(atomic.ASIDE):  # the old final/ is aside, the new one not yet in place
                die()
        os.rename = rename_then_die


if __name__ == "__main__":
    from hift_ds.train import run

    kill_in_swap(sys.argv[1])
    sys.exit(run(sys.argv[2:]))
