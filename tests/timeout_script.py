"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: both ranks join the process group that
accel.distributed sets up (runtime.collective_timeout_s: 3), then rank 1 stalls and rank 0's all-reduce must fail
within the timeout, not hang. Rank 0 prints how long it waited and exits 3.
"""

import os
import time

import torch
import torch.distributed as dist

from grpo import accel
from grpo.config import RuntimeConfig

model = torch.nn.Linear(4, 4)
_, _, rank, world = accel.distributed(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                      RuntimeConfig(collective_timeout_s=3))
assert world == 2, world
if rank == 1:
    time.sleep(8)  # a stuck peer, well past the timeout
t0 = time.perf_counter()
try:
    dist.all_reduce(torch.ones(1))
    print("all_reduce returned", flush=True)
except Exception as e:  # noqa: BLE001 - the timeout is what this checks
    print(f"collective failed after {time.perf_counter() - t0:.1f} s: {type(e).__name__}", flush=True)
    os._exit(3)
