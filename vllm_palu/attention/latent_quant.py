"""Quantized latent rows of the paged cache (fp8 e4m3, int4) and the matching fake quantization for reference models.

Contract (the Triton kernels implement exactly this; the PyTorch functions here are the oracle):

    LatentFormat (vllm_palu.config)       auto: latents stored unquantized in the cache dtype; fp8; int4
    LatentLayout (vllm_palu.config)       split: a K latent and a V latent per row; shared: one latent (rk == rv == r)
    row_bytes(rank_k, rank_v, latent_format, dtype_bytes, latent_layout)    bytes of one (token, group) row
    quantize_rows(k_latent [T, G, rk], v_latent [T, G, rv], latent_format, latent_layout) -> uint8 [T, G, row]
        (shared: quantizes k_latent only; v_latent is the same latent and is ignored)
    dequantize_rows(rows uint8 [..., row], rank_k, rank_v, latent_format, latent_layout)
        -> (k [..., rk] fp32, v [..., rv] fp32)   (shared: v is k)
    fake_quant_latent(x [..., r], latent_format) -> dequantize(quantize(x)) in fp32 (one K or V latent per vector)

Row layout per (token, group); scales are little-endian fp16 (``torch.float16`` viewed as 2 uint8). ``split``:

    auto  [rk K values][rv V values] in the cache dtype                                    row = rk + rv values
    fp8   [rk bytes K e4m3][rv bytes V e4m3][K scale fp16][V scale fp16]                  row = rk + rv + 4
    int4  [rk/2 K codes][rv/2 V codes][K scale fp16][K min fp16][V scale fp16][V min fp16] row = (rk + rv)/2 + 8

``shared`` (one latent z of r values, both the K and the V latent; its scales serve both):

    auto  [r values] in the cache dtype                                                    row = r values
    fp8   [r bytes e4m3][scale fp16]                                                       row = r + 2
    int4  [r/2 codes][scale fp16][min fp16]                                                row = r/2 + 4

fp8: scale = fp16(clamp(absmax / 448, 2^-24, 65504)) (fp32 math, rounded to fp16 *before* use);
     q = e4m3(clamp(x / scale, -448, 448)), round to nearest even; x^ = q * scale (exact in fp32).
int4 (asymmetric, per token, group, and latent): min = fp16(min(x)) clamped to the fp16 range;
     scale = fp16(clamp((max(x) - min(x)) / 15, 2^-24, 65504)) from the fp32 max and min;
     code = clamp(round_half_even((x - min16) / scale16), 0, 15); x^ = code * scale16 + min16 (fp32; the product
     is exact, so an FMA gives the same result).
     Packing "halves": byte j (0 <= j < r/2) = code[j] | code[j + r/2] << 4.
Page layout (what the paged cache holds): a layer's cache is ``uint8 [blocks, G, block_size, row]``, but within
each page (block) the K payloads of all (group, token) rows come first, ``[G, block_size, Pk]``, then (split) the V
payloads key-major, ``[G, Pv, block_size]`` (byte j of every token's V payload side by side), then the scale parts,
``[G, block_size, S]`` (:func:`page_views`; ``Pk``, ``Pv``: the latents' payload bytes, ``S`` :func:`scale_bytes`).
Inline scales would make a row 132 bytes for ranks 48 + 80 and cost payload rows the 16-byte alignment that wide
GPU loads need. Key-major V puts the bytes that P.V multiplies together (one V element of consecutive keys) side by
side, so the decode kernel loads them whole instead of byte by byte. The page size, and so vLLM's capacity, is the
same either way.
Requirements: split fp8 needs rk + rv even (2-byte aligned scales); split int4 needs rk and rv even; shared needs
rk == rv, and r even for fp8 and int4. Quantization always reads the latent as produced by the model (its dtype),
converted to fp32.
"""

from __future__ import annotations

import torch

from vllm_palu.config import LatentFormat, LatentLayout

LATENT_FORMATS = tuple(LatentFormat)
LATENT_LAYOUTS = tuple(LatentLayout)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_LEVELS = 15
SCALE_MIN = 2.0 ** -24  # smallest positive fp16: a rounded scale is never 0
FP16_MAX = 65504.0
LATENT_SCALE_BYTES = {"auto": 0, "fp8": 2, "int4": 4}  # per latent: fp16 scale (and fp16 minimum for int4)


def is_shared(latent_layout: LatentLayout) -> bool:
    """Whether a row holds one latent that is both the K and the V latent."""
    if latent_layout not in LATENT_LAYOUTS:
        raise ValueError(f"unknown latent layout {str(latent_layout)!r}; choose from {', '.join(LATENT_LAYOUTS)}")
    return latent_layout == LatentLayout.SHARED


def scale_bytes(latent_format: LatentFormat, latent_layout: LatentLayout = LatentLayout.SPLIT) -> int:
    """Scale bytes of one row: one scale set per latent it holds (two split, one shared)."""
    return LATENT_SCALE_BYTES[latent_format] * (1 if is_shared(latent_layout) else 2)


def payload_bytes(rank: int, latent_format: LatentFormat) -> int:
    """Payload bytes of one quantized latent of ``rank`` values (fp8: one a value; int4: two values a byte)."""
    return rank if latent_format == "fp8" else rank // 2


def check_ranks(rank_k: int, rank_v: int, latent_format: LatentFormat,
                latent_layout: LatentLayout = LatentLayout.SPLIT) -> str | None:
    """Why ``latent_format`` / ``latent_layout`` cannot store latents of these ranks, or None if they can."""
    if latent_format not in LATENT_FORMATS:
        return f"unknown latent format {str(latent_format)!r}; choose from {', '.join(LATENT_FORMATS)}"
    if latent_layout not in LATENT_LAYOUTS:
        return f"unknown latent layout {str(latent_layout)!r}; choose from {', '.join(LATENT_LAYOUTS)}"
    if latent_layout == LatentLayout.SHARED:
        if rank_k != rank_v:
            return (f"a shared latent is both the K and the V latent: rank_k and rank_v must be equal, got "
                    f"{rank_k} and {rank_v}")
        if latent_format != "auto" and rank_k % 2:
            return f"{latent_format} shared latents need an even rank, got {rank_k}"
        return None
    if latent_format == "fp8" and (rank_k + rank_v) % 2:
        return f"fp8 latents need rank_k + rank_v even (2-byte aligned scales), got {rank_k} + {rank_v}"
    if latent_format == "int4" and (rank_k % 2 or rank_v % 2):
        return f"int4 latents pack two codes a byte and need even ranks, got rank_k {rank_k}, rank_v {rank_v}"
    return None


def _require(rank_k: int, rank_v: int, latent_format: LatentFormat, latent_layout: LatentLayout) -> None:
    problem = check_ranks(rank_k, rank_v, latent_format, latent_layout)
    if problem:
        raise ValueError(problem)


def row_bytes(rank_k: int, rank_v: int, latent_format: LatentFormat, dtype_bytes: int = 2,
              latent_layout: LatentLayout = LatentLayout.SPLIT) -> int:
    """Bytes of one (token, group) cache row; ``dtype_bytes`` is the cache element size for ``latent_format='auto'``."""
    _require(rank_k, rank_v, latent_format, latent_layout)
    values = rank_k if is_shared(latent_layout) else rank_k + rank_v
    if latent_format == "auto":
        return values * dtype_bytes
    return payload_bytes(values, latent_format) + scale_bytes(latent_format, latent_layout)


def rank_v_of_row(row: int, rank_k: int, latent_format: LatentFormat,
                  latent_layout: LatentLayout = LatentLayout.SPLIT) -> int:
    """The V rank of cache rows ``row`` wide (bytes; for ``auto``, values), as the kernels infer it: the inverse of
    :func:`row_bytes`. Shared rows must be exactly one latent of ``rank_k`` wide."""
    if is_shared(latent_layout):
        expected = row_bytes(rank_k, rank_k, latent_format, 1, latent_layout)  # auto: values, 1 "byte" each
        if row != expected:
            raise ValueError(f"{latent_format} shared rows of rank {rank_k} are {expected} wide, got {row}")
        return rank_k
    if latent_format == "auto":
        return row - rank_k
    if latent_format == "fp8":
        return row - scale_bytes("fp8") - rank_k
    if latent_format == "int4":
        return 2 * (row - scale_bytes("int4")) - rank_k
    raise ValueError(f"unknown latent format {str(latent_format)!r}; choose from {', '.join(LATENT_FORMATS)}")


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """``[...]`` fp16-representable fp32 -> ``[..., 2]`` uint8 (little-endian fp16)."""
    return values.to(torch.float16).contiguous().view(torch.uint8).view(*values.shape, 2)


def _fp16_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` uint8 -> ``[...]`` fp32 (a copy: the bytes may sit at an odd offset)."""
    return raw.clone(memory_format=torch.contiguous_format).view(torch.float16)[..., 0].float()


def _fp8_scale(x: torch.Tensor) -> torch.Tensor:
    absmax = x.abs().amax(dim=-1, keepdim=True)
    return (absmax / FP8_MAX).clamp(SCALE_MIN, FP16_MAX).half().float()


def _fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _int4_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((high - low) / INT4_LEVELS).clamp(SCALE_MIN, FP16_MAX).half().float()
    return scale, low.clamp(-FP16_MAX, FP16_MAX).half().float()


def _int4_codes(x: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return ((x - low) / scale).round().clamp(0, INT4_LEVELS)


def fake_quant_latent(x: torch.Tensor, latent_format: LatentFormat) -> torch.Tensor:
    """Quantize and dequantize each vector over the last dim, as the cache does; fp32 result (``auto``: x)."""
    if latent_format == "auto":
        return x
    x = x.float()
    if latent_format == "fp8":
        scale = _fp8_scale(x)
        return _fp8_codes(x, scale).float() * scale
    if latent_format == "int4":
        scale, low = _int4_params(x)
        return _int4_codes(x, scale, low) * scale + low
    raise ValueError(f"unknown latent format {str(latent_format)!r}; choose from {', '.join(LATENT_FORMATS)}")


def _quantize_one(x: torch.Tensor, latent_format: LatentFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """One latent ``[T, G, r]`` -> (payload ``[T, G, r or r/2]`` uint8, scale bytes ``[T, G, 2 or 4]``)."""
    x = x.float()
    if latent_format == "fp8":
        scale = _fp8_scale(x)
        return _fp8_codes(x, scale).view(torch.uint8), _fp16_bytes(scale[..., 0])
    scale, low = _int4_params(x)
    codes = _int4_codes(x, scale, low).to(torch.uint8)
    half = codes.shape[-1] // 2
    packed = codes[..., :half] | (codes[..., half:] << 4)
    return packed, torch.cat((_fp16_bytes(scale[..., 0]), _fp16_bytes(low[..., 0])), dim=-1)


def quantize_rows(k_latent: torch.Tensor, v_latent: torch.Tensor | None, latent_format: LatentFormat,
                  latent_layout: LatentLayout = LatentLayout.SPLIT) -> torch.Tensor:
    """``k_latent [T, G, rk]``, ``v_latent [T, G, rv]`` (any float dtype) -> cache rows ``uint8 [T, G, row]``. Shared:
    the one latent is ``k_latent`` (``v_latent`` is the same latent and is not read)."""
    shared = is_shared(latent_layout)
    rank_k = k_latent.shape[-1]
    _require(rank_k, rank_k if shared else v_latent.shape[-1], latent_format, latent_layout)
    if latent_format == "auto":
        raise ValueError("quantize_rows: 'auto' latents are stored unquantized")
    k_payload, k_scales = _quantize_one(k_latent, latent_format)
    if shared:
        return torch.cat((k_payload, k_scales), dim=-1)
    v_payload, v_scales = _quantize_one(v_latent, latent_format)
    return torch.cat((k_payload, v_payload, k_scales, v_scales), dim=-1)


def _dequantize_one(payload: torch.Tensor, scales: torch.Tensor, latent_format: LatentFormat) -> torch.Tensor:
    if latent_format == "fp8":
        return payload.view(torch.float8_e4m3fn).float() * _fp16_from_bytes(scales)[..., None]
    codes = torch.cat((payload & 0x0F, payload >> 4), dim=-1).float()
    scale, low = _fp16_from_bytes(scales[..., :2])[..., None], _fp16_from_bytes(scales[..., 2:])[..., None]
    return codes * scale + low


def dequantize_rows(rows: torch.Tensor, rank_k: int, rank_v: int, latent_format: LatentFormat,
                    latent_layout: LatentLayout = LatentLayout.SPLIT) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows ``uint8 [..., row]`` -> (K latents ``[..., rk]``, V latents ``[..., rv]``), fp32; shared: the
    one latent, returned as both."""
    expected = row_bytes(rank_k, rank_v, latent_format, 1, latent_layout)
    if rows.shape[-1] != expected:
        raise ValueError(f"{latent_format} {latent_layout} rows of rank_k {rank_k} + rank_v {rank_v} are {expected} "
                         f"bytes, got {rows.shape[-1]}")
    k_end = payload_bytes(rank_k, latent_format)
    latent_scales = LATENT_SCALE_BYTES[latent_format]
    if is_shared(latent_layout):
        k = _dequantize_one(rows[..., :k_end], rows[..., k_end:], latent_format)
        return k, k
    v_end = k_end + payload_bytes(rank_v, latent_format)
    k = _dequantize_one(rows[..., :k_end], rows[..., v_end:v_end + latent_scales], latent_format)
    v = _dequantize_one(rows[..., k_end:v_end], rows[..., v_end + latent_scales:], latent_format)
    return k, v


def page_views(kv_cache: torch.Tensor, rank_k: int, latent_format: LatentFormat,
               latent_layout: LatentLayout = LatentLayout.SPLIT) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                           torch.Tensor]:
    """A quantized layer cache ``uint8 [blocks, G, block_size, row]`` as three views of the same memory (the page
    layout, module doc): K payload rows ``[blocks, G, block_size, Pk]``, V payloads key-major ``[blocks, G, Pv,
    block_size]`` (None in the shared layout, whose one payload is the K view's) and scale rows ``[blocks, G,
    block_size, S]``."""
    if kv_cache.dtype != torch.uint8 or not kv_cache.is_contiguous():
        raise ValueError(f"{latent_format} latents need a contiguous uint8 cache, got {kv_cache.dtype} with strides "
                         f"{tuple(kv_cache.stride())}")
    blocks, groups, block_size, row = kv_cache.shape
    scales = scale_bytes(latent_format, latent_layout)
    payload = row - scales
    k_bytes = payload if is_shared(latent_layout) else payload_bytes(rank_k, latent_format)
    flat = kv_cache.view(blocks, groups * block_size * row)
    k_end = groups * block_size * k_bytes
    v_end = groups * block_size * payload
    v_view = None
    if not is_shared(latent_layout):
        v_view = flat[:, k_end:v_end].view(blocks, groups, payload - k_bytes, block_size)
    return (flat[:, :k_end].view(blocks, groups, block_size, k_bytes), v_view,
            flat[:, v_end:].view(blocks, groups, block_size, scales))


def row_parts(rows: torch.Tensor, rank_k: int, latent_format: LatentFormat,
              latent_layout: LatentLayout = LatentLayout.SPLIT) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                          torch.Tensor]:
    """Quantized rows ``uint8 [..., row]`` as slices: K payload, V payload (None in the shared layout) and scale
    bytes, the parts a page holds apart (:func:`page_views`)."""
    payload = rows.shape[-1] - scale_bytes(latent_format, latent_layout)
    if is_shared(latent_layout):
        return rows[..., :payload], None, rows[..., payload:]
    k_end = payload_bytes(rank_k, latent_format)
    return rows[..., :k_end], rows[..., k_end:payload], rows[..., payload:]


def rows_to_pages(rows: torch.Tensor, rank_k: int, latent_format: LatentFormat,
                  latent_layout: LatentLayout = LatentLayout.SPLIT) -> torch.Tensor:
    """Rows ``uint8 [blocks, G, block_size, row]`` in token order -> the same data in the page layout."""
    pages = torch.empty_like(rows, memory_format=torch.contiguous_format)
    k_payload, v_payload, scales = page_views(pages, rank_k, latent_format, latent_layout)
    k_rows, v_rows, scale_rows = row_parts(rows, rank_k, latent_format, latent_layout)
    k_payload.copy_(k_rows)
    if v_payload is not None:
        v_payload.copy_(v_rows.transpose(-1, -2))
    scales.copy_(scale_rows)
    return pages


def pages_to_rows(kv_cache: torch.Tensor, rank_k: int, latent_format: LatentFormat,
                  latent_layout: LatentLayout = LatentLayout.SPLIT) -> torch.Tensor:
    """Inverse of :func:`rows_to_pages`."""
    k_payload, v_payload, scales = page_views(kv_cache, rank_k, latent_format, latent_layout)
    parts = [k_payload] + ([] if v_payload is None else [v_payload.transpose(-1, -2)]) + [scales]
    return torch.cat(parts, dim=-1)
