"""Running one model across processes on torch.distributed: tensor parallelism (tensor_parallel.py), the rank
group it runs in (mesh.py), the launchers (run.py), and serving, where the other ranks follow rank 0's engine
(follow.py). Expert and pipeline parallelism are not built yet (docs/distributed.md)."""
