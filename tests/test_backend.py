"""The metadata builder as vLLM drives it each step: host-side sizes and vLLM's own persistent tensors in, no read of
a device tensor (the device fields are "meta" tensors here, which raise on any read), the split-KV scratch shared by
every batch (and every captured CUDA graph), the split count a function of the batch size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_palu.attention import ops
from vllm_palu.attention.backend import KERNELS_ENV, PaluAttentionMetadataBuilder

HEADS, KV_HEADS, RANK_V, MAX_SEQS = 32, 8, 88, 64
PROGRAMS, SLOTS = 4, 2 * 132  # decode programs per request, programs the device runs at once
CAPTURED = [1, 2, 4, 8, 16, 32, 48, 128]  # CUDA-graph sizes


@pytest.fixture
def builder(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton")
    model_config = SimpleNamespace(get_num_kv_heads=lambda parallel: KV_HEADS,
                                   get_num_attention_heads=lambda parallel: HEADS)
    # vLLM's registry of attention layers by name; the layer's plan as a four-warp tile plans it on 132 SMs.
    layer = SimpleNamespace(impl=SimpleNamespace(plan=SimpleNamespace(
        decode_splits=lambda b, fewest=None: ops.decode_splits(b, PROGRAMS, SLOTS, fewest))))
    # vLLM's default CUDA-graph mode, with fewer captured sizes than its default (and one above max_num_seqs).
    compilation = SimpleNamespace(static_forward_context={"layer.0": layer}, cudagraph_capture_sizes=CAPTURED,
                                  cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    vllm_config = SimpleNamespace(model_config=model_config, parallel_config=None,
                                  scheduler_config=SimpleNamespace(max_num_seqs=MAX_SEQS),
                                  compilation_config=compilation)
    spec = SimpleNamespace(head_size_v=RANK_V, num_kv_heads=KV_HEADS)
    return PaluAttentionMetadataBuilder(spec, ["layer.0"], vllm_config, torch.device("meta"))


def batch(query_lens: list[int], context_lens: list[int]) -> CommonAttentionMetadata:
    """vLLM's common metadata with its device tensors on "meta" and its host copies on the CPU."""
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    meta = dict(dtype=torch.int32, device="meta")
    return CommonAttentionMetadata(
        query_start_loc=torch.empty(len(query_lens) + 1, **meta), query_start_loc_cpu=starts,
        seq_lens=torch.empty(len(query_lens), **meta), num_reqs=len(query_lens),
        num_actual_tokens=int(starts[-1]), max_query_len=max(query_lens), max_seq_len=max(context_lens),
        block_table_tensor=torch.empty(len(query_lens), 64, **meta),
        slot_mapping=torch.empty(int(starts[-1]), dtype=torch.int64, device="meta"),
        seq_lens_cpu_upper_bound=torch.tensor(context_lens, dtype=torch.int32))


def test_decode_batch_uses_persistent_scratch_and_batch_size_splits(builder):
    common = batch([1] * 3, [4000, 17, 900])
    first = builder.build(0, common)
    again = builder.build_for_cudagraph_capture(batch([1] * 3, [1, 1, 1]))
    assert first.num_decodes == 3 and first.prefill is None
    assert first.num_splits == again.num_splits == ops.decode_splits(3, PROGRAMS, SLOTS) > 1
    assert first.scratch is again.scratch is builder.scratch
    assert first.seq_lens is common.seq_lens and first.block_table is common.block_table_tensor


def test_captured_sizes_take_the_split_count_of_the_batches_they_replay(builder):
    """A FULL graph captured for 48 requests replays batches of 33 to 48 (vLLM pads them with requests that exit at
    once): its count is the fastest over those sizes; sizes no graph is captured for, and all of them without FULL
    graphs, take their own."""
    counts = [builder.build(0, batch([1] * b, [64] * b)).num_splits for b in range(1, MAX_SEQS + 1)]
    assert counts[48 - 1] == ops.decode_splits(48, PROGRAMS, SLOTS, fewest_requests=33) != ops.decode_splits(
        48, PROGRAMS, SLOTS)
    assert counts[40 - 1] == ops.decode_splits(40, PROGRAMS, SLOTS)
    assert counts[MAX_SEQS - 1] == ops.decode_splits(MAX_SEQS, PROGRAMS, SLOTS)  # 128 is above max_num_seqs
    builder.vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
    eager = PaluAttentionMetadataBuilder(builder.kv_cache_spec, ["layer.0"], builder.vllm_config, torch.device("meta"))
    assert eager.splits == [1] + [ops.decode_splits(b, PROGRAMS, SLOTS) for b in range(1, MAX_SEQS + 1)]


def test_mixed_batch_bounds_come_from_host_copies(builder):
    metadata = builder.build(0, batch([1, 1, 300, 7], [50, 9000, 300, 2000]))
    assert metadata.num_decodes == 2
    assert metadata.prefill == ops.PrefillBatch(first_request=2, num_requests=2, first_token=2, max_query_len=300,
                                                max_prefix_len=1993)


def test_scratch_holds_every_batch_size_the_builder_serves(builder):
    pad_v = 128
    for requests in range(1, MAX_SEQS + 1):
        splits = builder.build(0, batch([1] * requests, [64] * requests)).num_splits
        if splits > 1:
            assert requests * splits * HEADS * pad_v <= builder.scratch.partial.numel()
            assert requests * splits * HEADS * 2 <= builder.scratch.stats.numel()
    assert builder.scratch.arrivals.numel() >= MAX_SEQS * KV_HEADS


def test_builder_without_planned_layers_refuses_to_start(builder):
    """A builder whose layers have no kernel plan (process_weights_after_loading did not run) stops the engine at
    start-up with a clear error, not at the first decode step."""
    vllm_config = builder.vllm_config
    vllm_config.compilation_config.static_forward_context = {"layer.0": SimpleNamespace(impl=SimpleNamespace())}
    with pytest.raises(RuntimeError, match="planned its Triton kernels"):
        PaluAttentionMetadataBuilder(builder.kv_cache_spec, ["layer.0"], vllm_config, torch.device("meta"))
