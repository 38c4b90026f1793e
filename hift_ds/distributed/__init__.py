"""Data parallelism for HiFT: ZeRO-1/2 sharding of the active group, ZeRO-3 over DeepSpeed's partitions."""
