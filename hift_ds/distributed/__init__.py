"""Data parallelism for HiFT: ZeRO-1/2 sharding of the active group, ZeRO-3 over DeepSpeed's partitions."""
import os


def is_main_process() -> bool:
    """Whether this process is rank 0: the launcher's RANK, or a single process when no launcher set one."""
    # RANK, not torch.distributed's rank: it is set before the process group exists (and in processes
    # that never build one), and every launcher hift_ds supports sets it.
    return int(os.environ.get("RANK", "0")) == 0
