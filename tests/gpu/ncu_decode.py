"""One engine decode attention launch for Nsight Compute (ncu) to read: 400 sequences at ~900 tokens.

Run on a GPU machine from the repository root, under ncu (the s7e phase of device_run.sh):
  PYTHONPATH=$PWD python tests/gpu/ncu_decode.py fp8|bf16
The first launch compiles; the second is the one to profile (ncu --launch-skip 1 --launch-count 1).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_bench as kb  # noqa: E402

from batchllm.kernels.attention import unified_attention  # noqa: E402

kv_dt = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[sys.argv[1]]
g = torch.Generator().manual_seed(4)
args, hints, nbytes = kb.batch([1] * 400, torch.randint(100, 1700, (400,), generator=g).tolist(), seed=4, kv_dt=kv_dt)
for _ in range(2):
    unified_attention(*args, **hints)
torch.cuda.synchronize()
print(f"{sys.argv[1]}: {nbytes / 1e9:.3f} GB of K/V and query/output")
