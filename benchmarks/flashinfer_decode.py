"""FlashInfer's paged decode as a dense baseline for ``python -m benchmarks.attention_kernels`` (bf16 and fp8 KV pages).

FlashInfer is optional: without it the benchmark leaves these columns out. On the GPU machine nothing can be
downloaded, so carry a JIT-only release (flashinfer-python 0.5.3: a 7 MB py3-none-any wheel) and apache-tvm-ffi,
``pip install --no-deps --target DIR`` them and put DIR on PYTHONPATH; nvcc compiles the kernels on first use
(~20 s). Every configuration is checked against SDPA on a small copy before it is timed.
"""

from __future__ import annotations

from dataclasses import asdict

from benchmarks.kernel_cases import Case

PAGE = 16  # tokens per page, as in the Palu benchmark's cache


def _paged_inputs(case, kv_dtype, device):
    """Query, NHD pages ``[pages, 2, PAGE, kv_heads, head_dim]`` in a shuffled order, and the plan's index arrays."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    pages_per_seq = case.context // PAGE
    num_pages = case.batch * pages_per_seq
    pages = torch.randn(num_pages, 2, PAGE, case.kv_heads, case.head_dim, device=device, dtype=torch.bfloat16,
                        generator=generator).to(kv_dtype)
    indices = torch.randperm(num_pages, device=device, generator=generator).to(torch.int32)
    query = torch.randn(case.batch, case.heads, case.head_dim, device=device, dtype=torch.bfloat16,
                        generator=generator)
    indptr = torch.arange(case.batch + 1, device=device, dtype=torch.int32) * pages_per_seq
    last_len = torch.full((case.batch,), PAGE, device=device, dtype=torch.int32)
    return query, pages, indices, indptr, last_len


def _decoder(flashinfer, workspace, case, kv_dtype, tensor_cores, device):
    """A planned decode call on fresh inputs, and the inputs (for the reference check)."""
    import torch

    query, pages, indices, indptr, last_len = _paged_inputs(case, kv_dtype, device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores)
    wrapper.plan(indptr, indices, last_len, case.heads, case.kv_heads, case.head_dim, PAGE,
                 q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    return (lambda: wrapper.run(query, pages)), (query, pages, indices)


def _check(run, inputs, case) -> float:
    """Relative error vs fp32 SDPA on the same (stored, upcast) K/V."""
    import torch.nn.functional as F

    query, pages, indices = inputs
    ordered = pages[indices.long()].float().view(case.batch, -1, 2, PAGE, case.kv_heads, case.head_dim)
    keys = ordered[:, :, 0].flatten(1, 2).transpose(1, 2)
    values = ordered[:, :, 1].flatten(1, 2).transpose(1, 2)
    expected = F.scaled_dot_product_attention(query[:, :, None].float(), keys, values, enable_gqa=True)[:, :, 0]
    return float((run().float() - expected).norm() / expected.norm())


def decode_us(case, device) -> dict:
    """``flashinfer_us`` (bf16 pages) and ``flashinfer_fp8_us`` (e4m3 pages), each the faster of FlashInfer's
    CUDA-core and tensor-core decode; {} when FlashInfer is absent or a configuration fails (the reason is kept)."""
    try:
        import flashinfer
        import torch
        from triton.testing import do_bench
    except ImportError:
        return {}
    small = Case(**{**asdict(case), "batch": 2, "context": 4096})
    workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    row = {"flashinfer_version": flashinfer.__version__}
    for suffix, kv_dtype in (("", torch.bfloat16), ("_fp8", torch.float8_e4m3fn)):
        for tensor_cores in (True, False):
            try:
                run, inputs = _decoder(flashinfer, workspace, small, kv_dtype, tensor_cores, device)
                error = _check(run, inputs, small)
                if not error < 2e-2:
                    raise AssertionError(f"reference check failed: relative error {error:.2e}")
                run, inputs = _decoder(flashinfer, workspace, case, kv_dtype, tensor_cores, device)
                us = do_bench(run, return_mode="median") * 1e3
                del inputs
            except Exception as failure:  # noqa: BLE001 - JIT or runtime failure: record, keep benchmarking
                row[f"flashinfer{suffix}_error"] = str(failure).splitlines()[0][:120] if str(failure) else repr(failure)
                continue
            if us < row.get(f"flashinfer{suffix}_us", float("inf")):
                row[f"flashinfer{suffix}_us"] = us
                row[f"flashinfer{suffix}_tensor_cores"] = tensor_cores
    torch.cuda.empty_cache()
    return row
