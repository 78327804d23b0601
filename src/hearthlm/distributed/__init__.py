"""Running one model across processes on torch.distributed: tensor parallelism (tensor_parallel.py), the rank
group it runs in (mesh.py) and the launchers (run.py). Expert and pipeline parallelism are not built yet
(docs/distributed.md)."""
