"""Where the decode kernel's time goes (one GPU call): registers, spills and the SASS instruction mix of the
compiled kernel, then timings of ablated copies (one stage of the loop replaced by a constant at a time).

    python scripts/kernel_anatomy.py

Ablated copies are made by rewriting the kernel source into a temporary module; their outputs are wrong by
construction and only timed. Numbers feed docs/KERNEL_NOTES.md.
"""

from __future__ import annotations

import collections
import importlib.util
import inspect
import re
import sys
import tempfile
from pathlib import Path

import torch
from triton.testing import do_bench

from vllm_palu.attention import kernels, ops
from vllm_palu.bench import Case, build_inputs, floor_us

ABLATIONS = {
    "full kernel": [],
    "no cos/sin loads (constants)": [
        ("cos = tl.load(rope, mask=in_range[:, None], other=0.0).to(KEY_DTYPE)",
         "cos = tl.full([BLOCK_N, HALF], 0.5, KEY_DTYPE)"),
        ("sin = tl.load(rope + HALF, mask=in_range[:, None], other=0.0).to(KEY_DTYPE)",
         "sin = tl.full([BLOCK_N, HALF], 0.25, KEY_DTYPE)")],
    "no rotary at all": [
        ("rot_lo = key_lo * cos - key_hi * sin", "rot_lo = key_lo"),
        ("rot_hi = key_hi * cos + key_lo * sin", "rot_hi = key_hi")],
    "no key rebuild (row sums instead)": [
        ("key_lo = _rebuild_half(latent_0, latent_1, up_lo_0, up_lo_1, SPLIT_K, ACC_DTYPE, KEY_DTYPE)",
         "key_lo = tl.broadcast_to(tl.sum(latent_0, axis=1)[:, None], (BLOCK_N, HALF))"),
        ("key_hi = _rebuild_half(latent_0, latent_1, up_hi_0, up_hi_1, SPLIT_K, ACC_DTYPE, KEY_DTYPE)",
         "key_hi = tl.broadcast_to(tl.sum(latent_1, axis=1)[:, None], (BLOCK_N, HALF))")],
    "no latent loads (K and V constants)": [  # masks as values: same shapes and dtypes, no memory traffic
        ("latent_0 = tl.load(rows_k + rk0[None, :], mask=k_mask_0, other=0)",
         "latent_0 = k_mask_0.to(tl.bfloat16) * 0.01"),
        ("latent_1 = tl.load(rows_k + rk1[None, :], mask=in_range[:, None] & (rk1[None, :] < RANK_K), other=0)",
         "latent_1 = (in_range[:, None] & (rk1[None, :] < RANK_K)).to(tl.bfloat16) * 0.01"),
        ("v_0 = tl.load(rows_v + RANK_K + rv0[:, None], mask=v_mask_0, other=0)",
         "v_0 = v_mask_0.to(tl.bfloat16) * 0.01"),
        ("v_1 = tl.load(rows_v + RANK_K + rv1[:, None], mask=in_range[None, :] & (rv1[:, None] < RANK_V), other=0)",
         "v_1 = (in_range[None, :] & (rv1[:, None] < RANK_V)).to(tl.bfloat16) * 0.01")],
    "no P.V (values unused)": [
        ("acc_0 = acc_0 * alpha[None, :] + tl.dot(v_0, p.to(v_0.dtype))",
         "acc_0 = acc_0 * alpha[None, :] + tl.sum(p, axis=0)[None, :]"),
        ("acc_1 = acc_1 * alpha[None, :] + tl.dot(v_1, p.to(v_1.dtype))", "acc_1 = acc_1 * alpha[None, :]")],
}


def ablated_kernel(name: str, edits: list[tuple[str, str]], directory: Path):
    source = inspect.getsource(kernels)
    for old, new in edits:
        assert old in source, (name, old)
        source = source.replace(old, new)
    path = directory / f"ablated_{abs(hash(name))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module.paged_latent_attention_kernel


def sass_mix(compiled) -> str:
    try:
        sass = compiled.asm["sass"]
    except Exception as failure:  # noqa: BLE001 - needs nvdisasm, shipped with Triton
        return f"(no SASS: {failure})"
    opcodes = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    total = sum(opcodes.values())
    return f"{total} instructions: " + ", ".join(f"{op} {count}" for op, count in opcodes.most_common(24))


def main() -> None:
    device = torch.device("cuda")
    case = Case("llama3-8b", 32, 8, 128, 0.5, 1, 16, 32768)
    inputs = build_inputs(case, torch.bfloat16, device)
    floor = floor_us(case.palu_bytes(), case.palu_flops())
    original = ops.paged_latent_attention_kernel
    with tempfile.TemporaryDirectory() as tmp:
        for tuning in ({}, {"block_n": 128, "num_warps": 4}):
            for name, edits in ABLATIONS.items():
                ops.paged_latent_attention_kernel = ablated_kernel(name, edits, Path(tmp)) if edits else original
                run = lambda: ops.paged_latent_attention(**inputs, max_query_len=1,  # noqa: E731
                                                         max_seq_len=case.context, tuning=dict(tuning))
                run()
                torch.cuda.synchronize()
                compiled = ops.last_kernel
                us = do_bench(run, return_mode="median") * 1e3
                print(f"{tuning or 'default'} | {name:38s} | {us:7.1f} us | {floor / us:5.1%} of floor | "
                      f"regs {compiled.n_regs} spills {compiled.n_spills} shared {compiled.metadata.shared} B",
                      flush=True)
                if name == "full kernel":
                    print("   SASS:", sass_mix(compiled), flush=True)
    ops.paged_latent_attention_kernel = original


if __name__ == "__main__":
    main()
