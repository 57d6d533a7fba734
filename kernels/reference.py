"""Pure-torch references for every kernel. They are also the engine's attention on the CPU.

Layout (vLLM's names):
  query            [num_tokens, num_heads, head_dim]       tokens of all sequences, concatenated
  key_cache        [num_blocks, block_size, num_kv_heads, head_dim]   (value_cache alike)
  query_start_loc  [num_seqs + 1] int    sequence s owns query rows query_start_loc[s]:query_start_loc[s+1]
  seq_lens         [num_seqs] int        tokens in the cache for s after this step (context + query)
  block_table      [num_seqs, max_num_blocks_per_seq] int   logical block -> physical block
  slot_mapping     [num_tokens] int      block * block_size + offset for each new token; -1 = skip

Query row i of sequence s sits at position seq_len - query_len + i and attends causally to cache
positions 0..that position. K/V are read through block_table only: there is no contiguous per-sequence
cache anywhere in the engine.
"""
import torch
import torch.nn.functional as F


def _storage(t: torch.Tensor) -> torch.dtype:
    """The dtype to copy t's elements as: fp8 as bytes (torch's CPU index ops do not take fp8)."""
    return torch.uint8 if t.dtype == torch.float8_e4m3fn else t.dtype


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: an fp8 (e4m3) cache saturates at +-448 (torch's own cast would give NaN)."""
    if dtype == torch.float8_e4m3fn:
        top = torch.finfo(dtype).max
        return x.float().clamp(-top, top).to(dtype)
    return x.to(dtype)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """Write new K/V rows into the paged cache.

    key, value: [num_tokens, num_kv_heads, head_dim]; key_cache, value_cache:
    [num_blocks, block_size, num_kv_heads, head_dim], in key's dtype or float8_e4m3fn (to_cache_dtype);
    slot_mapping: [num_tokens], -1 skipped.
    """
    num_blocks, block_size = key_cache.shape[:2]
    flat_k = key_cache.view(num_blocks * block_size, *key_cache.shape[2:])
    flat_v = value_cache.view(num_blocks * block_size, *value_cache.shape[2:])
    slots = slot_mapping.long()
    if slots.numel() and int(slots.min()) < 0:  # padding rows: drop them
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    for flat, new in ((flat_k, key), (flat_v, value)):
        raw = _storage(flat)
        flat.view(raw).index_copy_(0, slots, to_cache_dtype(new, flat.dtype).view(raw))


def fp8_row_scales(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of 2 with amax <= 448 * scale, in fp32 (2^-100 for a row of zeros). A power of 2, so
    x / scale is exact in any division (the GPU's fast one too) and the kernel and this reference agree bit for
    bit; fp8's precision is relative, so it costs nothing but, at worst, the top binade's range."""
    f, e = torch.frexp(amax.float())  # amax = f * 2^e, f in [0.5, 1)
    e = torch.where(f <= 0.875, e - 9, e - 8)  # 448 = 0.875 * 2^9
    e = torch.where(amax > 0, e, torch.full_like(e, -100)).clamp(-100, 126)
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float32), e)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], fp32 scales [M]) with x ~= q * scale per row (fp8_row_scales)."""
    xf = x.float()
    scale = fp8_row_scales(xf.abs().amax(-1))
    return to_cache_dtype(xf / scale[:, None], torch.float8_e4m3fn), scale


def _gather_tokens(cache, block_table, num_blocks):
    """-> [n, num_blocks * block_size, H, D]: the sequences' blocks, token-major (a view of one copy).

    index_select copies whole blocks; entries past a sequence's end may be padding such as -1 (clamped here,
    masked by the caller)."""
    n = block_table.shape[0]
    idx = block_table[:, :num_blocks].reshape(-1).long().clamp(min=0)
    rows = cache.view(_storage(cache)).index_select(0, idx).view(cache.dtype)
    return rows.view(n, -1, *cache.shape[2:])


def _decode_group(q, k, v, mask, scale):
    """One query token per sequence. q: [n, h, d]; k, v: [n, L, kvh, d]; mask: [n, 1, 1, L] -> [n, h, d].

    Token-major K/V would need a transpose copy per layer (slow on the CPU). For few KV heads, multiplying
    every query head by every KV head and keeping the matching (diagonal) blocks is several times faster
    than that copy, for kvh-fold the (tiny) FLOPs.
    """
    n, h, d = q.shape
    L, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    k, v = k.to(q.dtype), v.to(q.dtype)
    if kvh <= 4:
        s = torch.matmul(q, k.reshape(n, L * kvh, d).transpose(1, 2))  # [n, h, L * kvh]
        s = s.view(n, kvh, g, L, kvh).diagonal(dim1=1, dim2=4).permute(0, 3, 1, 2)  # [n, kvh, g, L]
    else:
        s = torch.matmul(q.view(n, kvh, g, d), k.permute(0, 2, 3, 1))  # [n, kvh, g, L]
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least (fp64 stays fp64)
    p = (s.to(acc) * scale).masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    if kvh <= 4:
        o = torch.matmul(p.reshape(n, h, L), v.reshape(n, L, kvh * d))  # [n, h, kvh * d]
        o = o.view(n, kvh, g, kvh, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [n, kvh, g, d]
    else:
        o = torch.matmul(p, v.transpose(1, 2))  # [n, kvh, g, d]
    return o.reshape(n, h, d)


def paged_attention(query, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale=None, out=None):
    """Causal attention of each sequence's new query rows over its paged K/V; returns out.

    query: [num_tokens, num_heads, head_dim]; out (optional): same shape. GQA: num_heads is a multiple of
    num_kv_heads and query head h reads KV head h // (num_heads // num_kv_heads).
    Decode rows (query_len 1) go through one batched call; prefill chunks run one sequence at a time, so no
    padding to the longest chunk is ever computed.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size = key_cache.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_seqs = len(lens)
    q_lens = [qsl[i + 1] - qsl[i] for i in range(num_seqs)]
    gqa = key_cache.shape[2] != num_heads

    # Decode rows, sorted by length and batched in groups so that padding to the group's longest stays small.
    decode = sorted((i for i in range(num_seqs) if q_lens[i] == 1), key=lambda i: lens[i])
    for g in range(0, len(decode), 64):
        group = decode[g : g + 64]
        rows = torch.tensor([qsl[i] for i in group], dtype=torch.long, device=query.device)
        nb = -(-lens[group[-1]] // block_size)
        bt = block_table[torch.tensor(group, dtype=torch.long, device=query.device)]
        pos = torch.arange(nb * block_size, device=query.device)
        dl = torch.tensor([lens[i] for i in group], device=query.device)
        mask = (pos[None, :] < dl[:, None])[:, None, None, :]  # [n, 1, 1, L]
        o = _decode_group(query[rows], _gather_tokens(key_cache, bt, nb), _gather_tokens(value_cache, bt, nb),
                          mask, scale)
        out.index_copy_(0, rows, o.to(out.dtype))

    for i in range(num_seqs):
        ql = q_lens[i]
        if ql <= 1:
            continue
        sl = lens[i]
        nb = -(-sl // block_size)
        bt = block_table[i : i + 1]
        k = _gather_tokens(key_cache, bt, nb)[:, :sl].transpose(1, 2).to(query.dtype)  # [1, kvh, sl, d]
        v = _gather_tokens(value_cache, bt, nb)[:, :sl].transpose(1, 2).to(query.dtype)
        q = query[qsl[i] : qsl[i + 1]].transpose(0, 1).unsqueeze(0)  # [1, h, ql, d]
        ctx = sl - ql
        if ctx == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            qpos = torch.arange(ctx, sl, device=query.device)
            mask = torch.arange(sl, device=query.device)[None, :] <= qpos[:, None]  # [ql, sl]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[qsl[i] : qsl[i + 1]] = o[0].transpose(0, 1).to(out.dtype)
    return out


def dense_causal_attention(q, k, v, scale=None):
    """Plain causal attention of one sequence, the reference's reference: q [L, h, d], k/v [L, kvh, d]."""
    h, kvh = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // kvh, dim=1)
    v = v.repeat_interleave(h // kvh, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    L = q.shape[0]
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)


# AWQ (4-bit weights; batchllm/quant/awq.py). An int32 packs 8 consecutive output columns. AutoAWQ's packer puts
# column order[i] of each 8 in bits 4i..4i+3, order = [0, 2, 4, 6, 1, 3, 5, 7]; so column j of the 8 sits at
# bit 4 * [0, 4, 1, 5, 2, 6, 3, 7][j].
AWQ_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols] int32 (AWQ's packing) -> [rows, 8 * cols] int32, each 0..15."""
    shifts = torch.tensor(AWQ_SHIFTS, dtype=torch.int32, device=packed.device)
    return ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AWQ's (qweight [K, N/8] int32, qzeros [K/G, N/8] int32, scales [K/G, N]) -> W [K, N] fp32, the matrix
    x @ W multiplies: W[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n], G = K / scales.shape[0]."""
    group = qweight.shape[0] // scales.shape[0]
    q = awq_unpack(qweight)
    z = awq_unpack(qzeros).repeat_interleave(group, dim=0)
    return (q - z).float() * scales.float().repeat_interleave(group, dim=0)


def awq_linear(x: torch.Tensor, qweight, qzeros, scales) -> torch.Tensor:
    """x [M, K] @ the dequantized AWQ weight, accumulated in fp32 -> [M, N] fp32."""
    return x.float() @ awq_dequantize(qweight, qzeros, scales)
