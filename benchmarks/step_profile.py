"""Device time of steady decode steps, by kernel: where a served model's step goes, dense vs PALU.

`benchmarks/serve.py run --profile-steps N` calls :func:`profile_workload` in each engine after each timed workload:
the workload's prompts run again, vLLM's torch profiler (``profiler_config``, ``LLM.start_profile``) records
``N`` engine steps from a step past every prompt's prefill, and :func:`breakdown` sums the trace's kernels per step
into a few groups. The first steps of that run are the timed run's (vLLM admits requests by the blocks they hold,
not by their output length), so the profiled steps are the timed run's steady decode. Needs vLLM's
``LLM.start_profile(delay_iterations=, max_iterations=)`` (0.32 and 0.33).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

# Kernel name -> group, first match wins (Triton kernels by their function names, vLLM's and cuBLAS's by theirs).
GROUPS = [
    ("palu decode", re.compile(r"decode_attention_kernel")),
    ("palu cache write", re.compile(r"write_latents")),
    ("palu prefill", re.compile(r"rebuild_context|prefill_attention")),
    ("flash attention", re.compile(r"flash|fmha", re.I)),
    ("kv cache write", re.compile(r"reshape_and_cache|cache_kernel", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul|splitK", re.I)),
]
OTHER = "other"


def profiler_config(directory: Path) -> dict:
    """Engine argument ``profiler_config``: torch profiler traces into ``directory``, no stacks or shapes (small)."""
    return {"profiler": "torch", "torch_profiler_dir": str(directory), "torch_profiler_with_stack": False,
            "torch_profiler_record_shapes": False, "torch_profiler_use_gzip": True}


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if pattern.search(name)), OTHER)


def breakdown(trace_path: Path, steps: int) -> dict:
    """Device time per step (µs) by group and by kernel from a torch profiler trace of ``steps`` engine steps.
    Without device kernels (a CPU engine) it sums the host operators instead, nested ones included: a check that
    the profile ran, not a breakdown to add up."""
    opener = gzip.open if trace_path.suffix == ".gz" else open
    with opener(trace_path, "rt") as handle:
        events = json.load(handle).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    source = "kernel"
    if not kernels:  # CPU: top-level operators
        kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
        source = "cpu_op"
    per_kernel: dict[str, float] = defaultdict(float)
    for event in kernels:
        per_kernel[event["name"]] += float(event.get("dur", 0.0))
    per_group: dict[str, float] = defaultdict(float)
    for name, total in per_kernel.items():
        per_group[group_of(name)] += total
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:12]
    return {"source": source, "steps": steps, "step_us": sum(per_kernel.values()) / steps,
            "groups_us": {group: total / steps for group, total in sorted(per_group.items(), key=lambda i: -i[1])},
            "top_kernels_us": [[name[:120], total / steps] for name, total in top]}


def profile_workload(llm, prompts: list, params_class, workload: dict, steps: int) -> dict:
    """Run ``prompts`` again with the engine's profiler (its ``profiler_config``) on for ``steps`` engine steps,
    from a step after every prompt's prefill (their tokens over the step's token budget, plus 8), and return
    :func:`breakdown` of its trace."""
    config = llm.llm_engine.vllm_config
    directory = Path(config.profiler_config.torch_profiler_dir)
    delay = math.ceil(workload["requests"] * workload["prompt_len"]
                      / config.scheduler_config.max_num_batched_tokens) + 8
    output_len = workload["output_len"]
    if delay + steps + 2 > output_len:
        return {"error": f"{output_len} output tokens do not reach past step {delay} + {steps} profiled steps"}
    prefix = f"{workload['name']}-{time.time_ns()}"
    params = params_class(temperature=0.0, ignore_eos=True, max_tokens=delay + steps + 2)
    llm.start_profile(prefix, delay_iterations=delay, max_iterations=steps)
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.stop_profile()  # already stopped after max_iterations; this waits for the trace to be written
    traces = sorted(directory.glob(f"{prefix}_*.pt.trace.json*"))
    if not traces:
        return {"error": f"no trace {prefix}_*.pt.trace.json* in {directory}"}
    return {"first_step": delay, **breakdown(traces[-1], steps)}


def table(rows: list[dict]) -> list[str]:
    """Markdown: per configuration and workload, device time per profiled step by group (µs)."""
    profiled = [row for row in rows if isinstance(row.get("step_profile"), dict) and "groups_us" in row["step_profile"]]
    if not profiled:
        return []
    groups = [group for group, _ in GROUPS] + [OTHER]
    lines = ["| config | workload | steps from | device µs / step | " + " | ".join(groups) + " |",
             "|---|---|---|---|" + "---|" * len(groups)]
    for row in profiled:
        profile = row["step_profile"]
        cells = [f"{profile['groups_us'].get(group, 0.0):,.0f}" for group in groups]
        lines.append(f"| {row['config']} | {row['workload']} | {profile['first_step']} | {profile['step_us']:,.0f} | "
                     + " | ".join(cells) + " |")
    return lines
