"""Launch shaping rules with no numeric effect (so no kernel test sees them): where the fp8 decode's register
cap (maxnreg) applies, in default_config and in unified_attention's launches."""
import pytest
import torch

from batchllm.kernels import attention
from batchllm.kernels.attention_config import default_config

HOPPER_SMEM, ADA_SMEM = 232448, 101376
FP8 = torch.float8_e4m3fn


def test_register_cap_only_for_fp8_decode_at_head_dim_128_on_hopper_sized_cards():
    assert default_config(torch.bfloat16, 128, 1, 4, FP8, HOPPER_SMEM)["maxnreg"] == 168
    assert default_config(torch.float16, 128, 1, 4, FP8, HOPPER_SMEM)["maxnreg"] == 168
    # not measured elsewhere: the compiler's choice
    assert default_config(torch.bfloat16, 128, 1, 4, torch.bfloat16, HOPPER_SMEM)["maxnreg"] is None  # bf16 cache
    assert default_config(torch.float32, 128, 1, 4, FP8, HOPPER_SMEM)["maxnreg"] is None  # fp32 query
    assert default_config(torch.bfloat16, 128, 512, 4, FP8, HOPPER_SMEM)["maxnreg"] is None  # prefill
    assert default_config(torch.bfloat16, 64, 1, 4, FP8, HOPPER_SMEM)["maxnreg"] is None  # head_dim 64
    assert default_config(torch.bfloat16, 128, 1, 4, FP8, ADA_SMEM)["maxnreg"] is None  # Ada's shared memory


@pytest.fixture
def launches(monkeypatch):
    """unified_attention with its kernels replaced by recorders, as if compiled (not interpreted)."""
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, kwargs))

    monkeypatch.setattr(attention, "_unified_attention_kernel", Recorder("attention"))
    monkeypatch.setattr(attention, "_reduce_segments_kernel", Recorder("reduce"))
    monkeypatch.setattr(attention, "_interpreting", lambda: False)
    return calls


def _launch(q_lens, seq_lens, q_dtype=torch.bfloat16, kv_dtype=FP8, **kwargs):
    heads, kv_heads, head_dim, block = 8, 2, 128, 16
    query = torch.zeros(sum(q_lens), heads, head_dim, dtype=q_dtype)
    cache = torch.zeros(4, block, kv_heads, head_dim, dtype=kv_dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    table = torch.zeros(len(q_lens), 1, dtype=torch.int32)
    attention.unified_attention(query, cache, cache, qsl, torch.tensor(seq_lens, dtype=torch.int32), table,
                                max_query_len=max(q_lens), max_seq_len=max(seq_lens), **kwargs)


def _caps(calls):
    return [kw.get("maxnreg") for name, kw in calls if name == "attention"]


def test_fp8_decode_launches_carry_the_cap(launches):
    _launch([1] * 100, [900] * 100)  # 200 programs: no split
    assert _caps(launches) == [168]


def test_split_launches_go_without_it_unless_asked(launches):
    _launch([1], [32768])  # 2 programs: split-KV
    _launch([1], [32768], config={"maxnreg": 168})
    assert _caps(launches) == [None, 168]
    assert [name for name, _ in launches] == ["attention", "reduce", "attention", "reduce"]


def test_no_cap_for_other_launches(launches):
    _launch([1] * 100, [900] * 100, kv_dtype=torch.bfloat16)
    _launch([1] * 100, [900] * 100, q_dtype=torch.float32)
    _launch([1] * 100, [900] * 100, config={"maxnreg": 0})
    assert _caps(launches) == [None, None, None]


def test_mixed_batch_caps_its_decode_launch_only(launches):
    _launch([1] * 100 + [64], [900] * 100 + [64], num_decodes=100)
    assert _caps(launches) == [168, None]


@pytest.mark.parametrize("bad", ["168", -1, True, 168.0])
def test_bad_cap_is_refused(launches, bad):
    with pytest.raises(ValueError, match="maxnreg"):
        _launch([1] * 100, [900] * 100, config={"maxnreg": bad})
