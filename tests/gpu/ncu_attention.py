"""One engine attention launch for Nsight Compute (ncu) to read.

Run on a GPU machine from the repository root, under ncu (the s7e and s7i phases of device_run.sh):
  PYTHONPATH=$PWD python tests/gpu/ncu_attention.py CASE
CASE: fp8 | bf16 (decode, 400 sequences at ~900 tokens; an fp8 or bf16 cache), prefill-16x512 | prefill-1x8000
(bf16 chunks with no cached context, llama3-8b's heads). The first launch compiles; the second is the one to
profile (ncu --launch-skip 1 --launch-count 1).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_bench as kb  # noqa: E402

from batchllm.kernels.attention import unified_attention  # noqa: E402

case = sys.argv[1]
if case in ("fp8", "bf16"):
    kv_dt = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[case]
    args, hints, nbytes = kb.batch([1] * 400, kb.ctx900(), seed=4, kv_dt=kv_dt)
else:
    n, length = (int(x) for x in case.removeprefix("prefill-").split("x"))
    args, hints, nbytes = kb.batch([length] * n, [0] * n, seed=0, kv_dt=torch.bfloat16)
for _ in range(2):
    unified_attention(*args, **hints)
torch.cuda.synchronize()
print(f"{case}: {nbytes / 1e9:.3f} GB of K/V and query/output")
