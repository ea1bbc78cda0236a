"""Run one kernel-test case with one launcher tuning in its own process (an illegal address kills the context)."""
import json
import sys

import torch

sys.argv += [] if len(sys.argv) > 2 else ["{}"]
from tests.test_kernels import SMALL, FULL, check, make_case  # noqa: E402

shape = (SMALL + FULL)[int(sys.argv[1])]
tuning = {k: getattr(torch, v) if isinstance(v, str) and v.startswith("float") else v
          for k, v in json.loads(sys.argv[2]).items()}
seq_lens, query_lens, heads, kv_heads, group_size, head_dim, rank_k, rank_v, block_size = shape
case = make_case(seq_lens, query_lens, heads, kv_heads, group_size, head_dim, rank_k, rank_v, block_size,
                 torch.bfloat16, seed=len(seq_lens))
check(case, tuning=tuning)
torch.cuda.synchronize()
print("ok", shape, tuning)
