"""How much an error in each k/v output direction costs downstream, per latent group (``[groups, width, width]``).

* Values: attention mixes value vectors, then each query head j sharing KV head h applies its block of ``o_proj``:
  an error ``e`` in head h's value costs ``sum_j ||W_o^(j) e||^2``, i.e. the Gram ``sum_j W_o^(j)T W_o^(j)``.
* Keys: keys are rebuilt before RoPE, which rotates the pairs (i, i + head_dim/2) by position-dependent angles.
  Averaged over the angles, an error ``e`` in pair p of head h costs ``sum_j E|q_jp|^2 |e_p|^2 / 2``: a diagonal
  weight, the query energy of the pair, from the layer's input Gram (``E qq^T = W_q X^T X W_q^T / tokens``;
  a q bias is ignored).
"""

from __future__ import annotations

import torch
from torch import nn


def output_grams(attention: nn.Module, gram: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
    """{"k": ..., "v": ...} float64 ``[num_groups, group_width, group_width]`` for one attention module."""
    head_dim = attention.head_dim
    per_kv = attention.num_key_value_groups  # query heads per KV head
    w_q = attention.q_proj.weight.detach().double()
    w_o = attention.o_proj.weight.detach().double()
    heads = w_q.shape[0] // head_dim
    energy = ((w_q @ gram) * w_q).sum(1).view(heads, head_dim)  # E q^2 per query head and dim (up to a scale)
    pairs = energy.view(heads, 2, head_dim // 2).sum(1).repeat(1, 2) / 2  # rotate-half pairs share their energy
    key_weight = pairs.view(heads // per_kv, per_kv, head_dim).sum(1)  # [kv heads, head_dim]
    blocks = w_o.T.reshape(heads // per_kv, per_kv, head_dim, -1)
    value_blocks = torch.einsum("kjdo,kjeo->kde", blocks, blocks)  # [kv heads, head_dim, head_dim]
    return {"k": _group(torch.diag_embed(key_weight), num_groups),
            "v": _group(value_blocks, num_groups)}


def _group(blocks: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-head ``[kv_heads, d, d]`` blocks -> block-diagonal per group ``[num_groups, heads_per_group*d, ...]``."""
    per_group = blocks.shape[0] // num_groups
    return torch.stack([torch.block_diag(*blocks[g * per_group:(g + 1) * per_group]) for g in range(num_groups)])
