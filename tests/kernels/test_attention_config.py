"""Launch shaping rules of kernels/attention_config.py that have no numeric effect (so no kernel test sees them)."""
import torch

from batchllm.kernels.attention_config import default_config

HOPPER_SMEM, ADA_SMEM = 232448, 101376


def test_register_cap_only_for_fp8_decode_at_head_dim_128_on_hopper_sized_cards():
    fp8 = torch.float8_e4m3fn
    assert default_config(torch.bfloat16, 128, 1, 4, fp8, HOPPER_SMEM)["maxnreg"] == 168
    assert default_config(torch.float16, 128, 1, 4, fp8, HOPPER_SMEM)["maxnreg"] == 168
    # not measured elsewhere: the compiler's choice
    assert default_config(torch.bfloat16, 128, 1, 4, torch.bfloat16, HOPPER_SMEM)["maxnreg"] is None  # bf16 cache
    assert default_config(torch.bfloat16, 128, 512, 4, fp8, HOPPER_SMEM)["maxnreg"] is None  # prefill
    assert default_config(torch.bfloat16, 64, 1, 4, fp8, HOPPER_SMEM)["maxnreg"] is None  # head_dim 64
    assert default_config(torch.bfloat16, 128, 1, 4, fp8, ADA_SMEM)["maxnreg"] is None  # Ada's shared memory
