"""Compile the decode kernel for the H200 (sm_90) on a machine without a GPU, and print what the compiler made of
it: registers, spills, shared memory and the SASS instruction mix of each KV loop (full tiles, then the masked last
tile). Lets kernel variants be judged by instruction counts before spending GPU time on timing them.

    python -m benchmarks.compile_sm90 [--tiles 16:1:3,64:2:2] [--latent auto|fp8|int4] [--dump DIR]
        [--group-size 8 --ranks 320,704 --layout split|shared]

Needs only Triton (its bundled ptxas and nvdisasm); use vLLM 0.33's, 3.8, for numbers that carry over to serving
(``pip install --no-deps --target DIR triton==3.8.0``, ``PYTHONPATH=DIR``). The shapes are Llama-3-8B's at
kv-ratio 0.5 (default: per head, K rank 48, V rank 80; ``--group-size``, ``--ranks``, ``--layout`` for the others,
``--kv-heads 32`` for Llama-2-7B's), and the constexprs are the ones the launcher's plan gives the kernel
(``ops.plan_layer``; ``--rebuild-dtype``, ``--join-halves`` override its choices).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_palu.attention import kernels, ops

POINTERS = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "scale_ptr": "*fp16",
            "k_up_ptr": "*bf16", "k_up_scale_ptr": "*fp32", "k_bias_ptr": "*bf16",
            "cos_sin_ptr": "*fp16", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_ptr": "*i32",
            "out_ptr": "*bf16", "partial_ptr": "*fp32", "stats_ptr": "*fp32", "arrivals_ptr": "*i32"}
# Row strides the kernel takes as constexprs (16-bit rows of 48 + 80 latents; quantized pages differ, which moves
# immediates, not the instruction mix).
STRIDE_CONSTEXPRS = {"STRIDE_CN": 128, "STRIDE_SN": 128, "STRIDE_CS": 128}
SCALARS = {"scale": "fp32"}


def decode_constexprs(config: ops.KernelConfig, latent: str, rank_k: int = 48, rank_v: int = 80,
                      group_size: int = 1, latent_layout: str = "split", kv_heads: int = 8) -> tuple[dict, int, int]:
    """The decode kernel's constexprs, warps and stages as the launcher's plan sets them for Llama-3-8B shapes
    (32 query heads, 8 KV heads of 128 dims in groups of ``group_size``, bf16 weights, a Llama-3 rotary table;
    ``kv_heads`` 32: Llama-2-7B's)."""
    k_up = torch.zeros(kv_heads // group_size, group_size * 128, rank_k, dtype=torch.bfloat16)
    angles = torch.arange(4096)[:, None] * (1.0 / 500000.0 ** (torch.arange(0, 128, 2) / 128))[None, :]
    table = torch.cat([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)
    decode = dict(ops.plan_layer(k_up, None, table, True, 32, rank_v, 128 ** -0.5, latent, config,
                                 latent_layout).decode)
    warps, stages = decode.pop("num_warps"), decode.pop("num_stages")
    decode.pop("maxnreg")  # a launch option: compile_kernel takes --maxnreg
    return {**decode, "BLOCK_SIZE": 16, "PAIRED_CVT": True}, warps, stages  # PAIRED_CVT: as planned on a GPU


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None):
    """Compile ``fn`` for sm_90 with every non-constexpr argument typed as the decode benchmark passes it (strides
    are i32 and, like Triton's specialization of real strides, known to be multiples of 16 except the unit ones)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in STRIDE_CONSTEXPRS and name not in constexprs:
            constexprs = {**constexprs, name: STRIDE_CONSTEXPRS[name]}
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = SCALARS.get(name, "i32")
            if name.startswith("stride"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg})


INSTRUCTION = re.compile(r"^[0-9a-f-]{2}:[^\t]*\t(?:@!?U?P\w+ )?([A-Z][A-Z0-9_.]*)(.*)$")


def loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop body (a label up to a branch back to it), in program order. Triton's SASS lists
    instructions as ``control\tOPCODE operands;`` under ``LBBn:`` labels."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    bodies = []
    for line in sass.splitlines():
        label = re.match(r"^(\w+):$", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = INSTRUCTION.match(line)
        if not match:
            continue
        instructions.append(match.group(1))
        target = match.group(2).strip(" ;")
        if match.group(1).startswith("BRA") and target in labels:
            bodies.append(collections.Counter(instructions[labels[target]:]))
    return bodies


def resources(compiled) -> str:
    """Registers and spill stores from ``cuobjdump --dump-resource-usage`` (the launcher's n_regs needs a GPU)."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin.name], check=True,
                               capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", usage).group(1)
    spills = re.search(r"STACK:(\d+)", usage).group(1)
    return f"{registers} registers, stack {spills} B"


def report(name: str, compiled, dump: Path | None = None) -> None:
    print(f"{name}: {resources(compiled)}, shared {compiled.metadata.shared} B")
    for body in loops(compiled.asm["sass"]):
        print(f"   loop of {sum(body.values())} instructions: "
              + ", ".join(f"{op} {count}" for op, count in body.most_common(24)))
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        for kind in ("ttgir", "ptx", "sass"):
            (dump / f"{name.replace(' ', '_')}.{kind}").write_text(compiled.asm[kind])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default="16:1:3", help="block_n:warps:stages,... (default: the decode default)")
    parser.add_argument("--latent", default="auto", choices=["auto", "fp8", "int4"])
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--maxnreg", type=int, help="register cap per thread (Triton's maxnreg option)")
    parser.add_argument("--no-rope-shift", action="store_true", help="the per-tile rotary table (ROPE_SHIFT off)")
    parser.add_argument("--cache-dtype", default="bf16", help="element type of 16-bit latent pages (bf16, fp16)")
    parser.add_argument("--group-size", type=int, default=1, help="KV heads per latent group (1, 2, 4, 8)")
    parser.add_argument("--ranks", default="48,80", help="rank_k,rank_v of a group (default: kv 0.5 per head)")
    parser.add_argument("--layout", default="split", choices=["split", "shared"])
    parser.add_argument("--heads", type=int, help="KV heads per program (default: the plan's, ops.decode_heads)")
    parser.add_argument("--fp8-mma", action="store_true", help="fp8 latents: keys rebuilt on fp8 tensor cores")
    parser.add_argument("--kv-heads", type=int, default=8, help="of the 32 query heads (8: Llama-3-8B, 32: Llama-2-7B)")
    parser.add_argument("--rebuild-dtype", choices=["fp16", "bf16"], help="key rebuild operands (default: the plan's)")
    parser.add_argument("--join-halves", choices=["yes", "no"], help="one score dot over both rotary halves, or one "
                        "per half (default: the plan's)")
    parser.add_argument("--unpaired-cvt", action="store_true", help="fp32 -> fp16 conversions as triton emits them "
                        "(PAIRED_CVT off: one element an instruction)")
    args = parser.parse_args()
    rank_k, rank_v = map(int, args.ranks.split(","))
    row = rank_k if args.layout == "shared" else rank_k + rank_v
    STRIDE_CONSTEXPRS.update(STRIDE_CN=row, STRIDE_SN=row)
    POINTERS["cache_ptr"] = POINTERS["v_cache_ptr"] = "*u8" if args.latent != "auto" else f"*{args.cache_dtype}"
    if args.fp8_mma:
        POINTERS["k_up_ptr"] = "*fp8e4nv"
    for tile in args.tiles.split(","):
        block_n, warps, stages = map(int, tile.split(":"))
        config = ops.KernelConfig(decode_block_n=block_n, decode_warps=warps, decode_stages=stages,
                                  decode_heads=args.heads, fp8_mma=args.fp8_mma,
                                  rebuild_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.rebuild_dtype),
                                  join_halves={"yes": True, "no": False}.get(args.join_halves),
                                  rope_shift=False if args.no_rope_shift else None)
        constexprs, warps, stages = decode_constexprs(config, args.latent, rank_k, rank_v, args.group_size,
                                                      args.layout, args.kv_heads)
        if args.unpaired_cvt:
            constexprs["PAIRED_CVT"] = False
        compiled = compile_kernel(kernels.decode_attention_kernel, constexprs, warps, stages, args.maxnreg)
        shift = " shift" if constexprs["ROPE_SHIFT"] else ""
        heads = f" {constexprs['HEADS']}h" if args.group_size > 1 else ""
        rebuild = (f" rebuild {constexprs['REBUILD_DTYPE']}" + (" joined" if constexprs["JOIN_HALVES"] else "")
                   + ("" if constexprs["PAIRED_CVT"] else " unpaired cvt"))
        report(f"{args.latent} {block_n}x{warps}w{stages}s{heads}{shift}{rebuild}", compiled, args.dump)


if __name__ == "__main__":
    main()
