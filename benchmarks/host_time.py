"""Host time per attention call in eager mode: the PALU backend against the dense one, inside a real vLLM engine.

    python -m benchmarks.host_time --out DIR [--shape llama3-8b] [--dense-backend FLASH_ATTN] [--kv-ratio 0.5]
    python -m benchmarks.host_time --out DIR --shape tiny --dense-backend auto        # CPU
    python -m benchmarks.host_time --out DIR --profile   # also: where the host time goes (cProfile, into the logs)

Every attention layer's ``impl.forward`` (and ``impl.do_kv_cache_update``, where the dense backend writes its cache
in a separate call) is wrapped with ``time.perf_counter_ns()`` in the worker. There is no device sync: a call only
launches kernels, so with few short requests the GPU keeps up and what is measured is the Python and launch cost per
layer call (cache write included). Calls are classed by their metadata's ``max_query_len``: 1 = decode-only, more =
mixed/prefill. Workloads: ``decode`` (all requests decoding) and ``mixed`` (one long prompt prefilled in chunks of
``--chunk`` tokens while the others decode). Target: PALU at most 1.5x the dense host time, decode and mixed.

Each backend runs in its own process; the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with
``enforce_eager=True``. Output: DIR/host_time.json and DIR/host_time.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: the repository root goes first on the path (the benchmarks import each other as
    # benchmarks.*), not benchmarks/ itself, whose module names could shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import checkpoints  # noqa: E402
from benchmarks.serve import (child_env, count_jit_lines, last_error_line, log, parse_bytes, read_json,  # noqa: E402
                              stop_group, stop_on_sigterm, write_json)

TARGET = 1.5  # PALU host time per call / dense, decode and mixed
RECORDS = "host_time_records"  # attribute of the worker holding the measurements


# ---------------------------------------------------------------------------------------------------------------
# In the worker (collective_rpc functions: they get the worker as their argument)
# ---------------------------------------------------------------------------------------------------------------


def attention_layers(worker) -> dict:
    """Attention layers by name, from the forward context the model runner (V1 on CPU, V2 on GPU) registered."""
    runner = getattr(worker, "model_runner", None)
    compilation = getattr(runner, "compilation_config", None) or worker.vllm_config.compilation_config
    return {name: layer for name, layer in compilation.static_forward_context.items() if hasattr(layer, "impl")}


def call_class(metadata) -> str:
    query_len = getattr(metadata, "max_query_len", None)
    if query_len is None:
        return "unknown"
    return "decode" if query_len <= 1 else "mixed"


def timed(function, name: str, parts: dict):
    """``function`` adding its host time (ns) under ``name`` to ``parts``."""
    from time import perf_counter_ns

    def wrapper(*args, **kwargs):
        start = perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0) + perf_counter_ns() - start

    return wrapper


def install_part_timers(layers: dict, parts: dict) -> None:
    """PALU only: time the launchers inside a forward (cache write, decode, the prefill path and, within it, the
    context rebuild and the FlashAttention call), so that a call's host time comes apart by launch."""
    ops = next((layer.impl.kernels for layer in layers.values() if getattr(layer.impl, "kernels", None)), None)
    if ops is not None:  # the launcher module every layer shares
        for name in ("write_latents", "decode_attention", "rebuild_context"):
            setattr(ops, name, timed(getattr(ops, name), name, parts))
    for layer in layers.values():
        impl = layer.impl
        if getattr(impl, "prefill", None) is not None:
            if hasattr(impl.prefill, "attend"):  # FlashPrefill: vLLM's FlashAttention call
                impl.prefill.attend = timed(impl.prefill.attend, "flash_attention", parts)
            impl.prefill = timed(impl.prefill, "prefill", parts)


def install_timers(worker) -> dict:
    """Wrap each layer's impl.forward (+ do_kv_cache_update): records (class, forward ns, cache-write ns, the
    forward's parts in ns by launcher: PALU only)."""
    from time import perf_counter_ns

    records: list = []
    setattr(worker, RECORDS, records)
    pending: dict[str, int] = {}  # cache-write time of a layer, added to its next forward
    parts: dict[str, int] = {}  # the current forward's launchers (PALU)
    layers = attention_layers(worker)
    install_part_timers(layers, parts)
    for name, layer in layers.items():
        impl = layer.impl

        def timed_forward(*args, _forward=impl.forward, _name=name, **kwargs):
            parts.clear()
            start = perf_counter_ns()
            result = _forward(*args, **kwargs)
            spent = perf_counter_ns() - start
            metadata = args[5] if len(args) > 5 else kwargs.get("attn_metadata")
            write = pending.pop(_name, 0)
            if metadata is not None:  # None: vLLM's memory-profiling run
                records.append((call_class(metadata), spent, write, dict(parts)))
            return result

        impl.forward = timed_forward
        if hasattr(impl, "do_kv_cache_update"):
            impl.do_kv_cache_update = timed(impl.do_kv_cache_update, name, pending)
    impls = sorted({type(layer.impl).__name__ for layer in layers.values()})
    backends = sorted({layer.attn_backend.get_name() for layer in layers.values() if hasattr(layer, "attn_backend")})
    return {"layers": len(layers), "attention_impls": impls, "attention_backends": backends,
            "model_runner": type(getattr(worker, "model_runner", None)).__name__}


def take_records(worker) -> list:
    records = getattr(worker, RECORDS)
    taken = list(records)
    records.clear()
    return taken


# ---------------------------------------------------------------------------------------------------------------
# One backend, in its own process
# ---------------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summarize(backend: str, workload: str, records: list) -> list[dict]:
    rows = []
    for kind in sorted({r[0] for r in records}):
        totals = [(r[1] + r[2]) / 1e3 for r in records if r[0] == kind]
        writes = [r[2] / 1e3 for r in records if r[0] == kind]
        names = sorted({part for r in records if r[0] == kind for part in r[3]})
        parts = {part: statistics.median(r[3].get(part, 0) / 1e3 for r in records if r[0] == kind) for part in names}
        rows.append({"backend": backend, "workload": workload, "class": kind, "calls": len(totals),
                     "median_us": statistics.median(totals), "p90_us": percentile(totals, 0.9),
                     "mean_us": statistics.fmean(totals), "separate_write_median_us": statistics.median(writes),
                     "parts_median_us": parts})
    return rows


def measure_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker lives in this process: its layers are reachable
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    info = llm.collective_rpc(install_timers)[0]
    print(f"HOST {spec['backend']}: timers on {json.dumps(info)}", flush=True)
    rng = np.random.default_rng(spec["seed"])
    words = spec["vocab_words"]

    def prompts(count: int, length: int) -> list:
        return [TokensPrompt(prompt_token_ids=rng.integers(0, words, length).tolist()) for _ in range(count)]

    rows = []
    for name, (count, prompt_len, output_len, long_len) in spec["workloads"].items():
        batch = prompts(count, prompt_len)
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len)] * count
        if long_len:  # the long prompt comes last: it is prefilled in chunks while the others decode
            batch += prompts(1, long_len)
            params += [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)]
        llm.generate(batch, params, use_tqdm=False)  # warm-up: first-call costs (kernel compiles) stay out
        llm.collective_rpc(take_records)
        began = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - began
        records = llm.collective_rpc(take_records)[0]
        if spec.get("profile"):  # once more under cProfile (it slows Python): where the time goes, into the log
            profiler = cProfile.Profile()
            profiler.runcall(llm.generate, batch, params, use_tqdm=False)
            llm.collective_rpc(take_records)
            print(f"HOST {spec['backend']} {name}: cProfile of a repeat run, top functions by own time", flush=True)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(40)
        for row in summarize(spec["backend"], name, records):
            row.update(info, wall_s=wall)
            rows.append(row)
            print(f"HOST {json.dumps(row)}", flush=True)
    write_json(Path(spec["rows_path"]), {"rows": rows})
    os._exit(0)  # skip the slow engine teardown


# ---------------------------------------------------------------------------------------------------------------
# Driver and report
# ---------------------------------------------------------------------------------------------------------------


def parse_sizes(text: str, count: int, what: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != count or min(sizes) < 1:
        raise SystemExit(f"error: {what} needs {count} positive integers separated by commas, got {text!r}")
    return sizes


def run(args) -> None:
    shape = checkpoints.get_shape(args.shape, args.dtype)
    decode = parse_sizes(args.decode, 3, "--decode N,PROMPT,OUTPUT")
    mixed = parse_sizes(args.mixed, 4, "--mixed N,PROMPT,OUTPUT,LONG_PROMPT")
    workloads = {"decode": decode + [0], "mixed": mixed}
    try:
        extra = json.loads(args.engine_args)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: --engine-args is not valid JSON: {error}") from None
    engine = {"load_format": "dummy", "dtype": shape.dtype, "enforce_eager": True, "enable_chunked_prefill": True,
              "max_num_batched_tokens": args.chunk, "max_num_seqs": max(decode[0], mixed[0] + 1),
              "max_model_len": max(decode[1] + decode[2], mixed[1] + mixed[2], mixed[3] + 1),
              "enable_prefix_caching": False, "seed": args.seed, "kv_cache_memory_bytes": args.kv_memory, **extra}
    args.out.mkdir(parents=True, exist_ok=True)
    root = checkpoints.checkpoint_root(args.shape, shape.dtype, args.checkpoints)
    models = {"dense": checkpoints.build(shape, root / "dense"),
              "palu": checkpoints.build(shape, root / f"palu-{args.kv_ratio}", kv_ratio=args.kv_ratio)}
    rows, errors = [], {}
    started = time.monotonic()
    meta = {"shape": args.shape, "dtype": shape.dtype, "engine": engine, "workloads": workloads,
            "dense_backend": args.dense_backend, "kv_ratio": args.kv_ratio}
    for backend in ("dense", "palu"):
        remaining = None if args.deadline is None else args.deadline - (time.monotonic() - started)
        if remaining is not None and remaining < 20:
            errors[backend] = "skipped: deadline reached"
            continue
        timeout = args.timeout if remaining is None else min(args.timeout, remaining)
        chosen = "PALU" if backend == "palu" else args.dense_backend
        settings = dict(engine, **({} if chosen == "auto" else {"attention_backend": chosen}))
        rows_path, log_path = args.out / f".host-{backend}.rows.json", args.out / f"host-{backend}.log"
        rows_path.unlink(missing_ok=True)
        spec_path = args.out / f".host-{backend}.spec.json"
        write_json(spec_path, {"backend": backend, "model": str(models[backend]), "engine": settings,
                               "seed": args.seed, "vocab_words": checkpoints.tokenizer_words(shape),
                               "workloads": workloads, "rows_path": str(rows_path), "profile": args.profile})
        log(f"host time {backend}: starting (timeout {timeout:.0f} s, log {log_path})")
        with open(log_path, "w") as log_file:
            process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "measure", str(spec_path)],
                                       stdout=log_file, stderr=subprocess.STDOUT, env=child_env(),
                                       start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            errors[backend] = f"timeout after {timeout:.0f} s"
        finally:
            stop_group(process)
        found = read_json(rows_path, {}).get("rows", [])
        if not found and backend not in errors:
            errors[backend] = f"exited with {process.returncode}: {last_error_line(log_path)}"
        for row in found:
            row["jit_lines"] = count_jit_lines(log_path)
        rows += found
        log(f"host time {backend}: {errors.get(backend, f'{len(found)} rows')}")
        write_json(args.out / "host_time.json", {"meta": meta, "rows": rows, "errors": errors})
    result = {"meta": meta, "rows": rows, "errors": errors}
    write_json(args.out / "host_time.json", result)
    text = report(result)
    (args.out / "host_time.md").write_text(text)
    print(text, flush=True)


def report(result: dict) -> str:
    rows = result["rows"]
    by_key = {(r["backend"], r["workload"], r["class"]): r for r in rows}
    meta = result["meta"]
    lines = [f"# Host time per attention call (eager), {meta['shape']} ({meta['dtype']}), dummy weights", "",
             f"dense backend {meta['dense_backend']}, Palu kv-ratio {meta['kv_ratio']}; workloads (N, prompt, "
             f"output, long prompt): {json.dumps(meta['workloads'])}; chunk {meta['engine']['max_num_batched_tokens']}"
             " tokens. Per layer call: impl.forward plus a separate cache write (do_kv_cache_update) if any.", "",
             "| workload | class | backend | impl | calls | median us | p90 us | separate write median us |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['workload']} | {row['class']} | {row['backend']} | {'/'.join(row['attention_impls'])} | "
                     f"{row['calls']} | {row['median_us']:.1f} | {row['p90_us']:.1f} | "
                     f"{row['separate_write_median_us']:.1f} |")
    timed_parts = [row for row in rows if row.get("parts_median_us")]
    if timed_parts:
        lines += ["", "PALU's calls by launcher (median us; the prefill path includes its rebuild and FlashAttention "
                  "call):", ""]
        for row in timed_parts:
            lines.append(f"- {row['workload']} workload, {row['class']} calls: " + ", ".join(
                f"{name} {us:.1f}" for name, us in row["parts_median_us"].items()))
    lines += ["", f"PALU / dense (target <= {TARGET}x on decode and mixed):", ""]
    for workload, kind in (("decode", "decode"), ("mixed", "mixed")):
        palu, dense = by_key.get(("palu", workload, kind)), by_key.get(("dense", workload, kind))
        if palu and dense:
            median, p90 = palu["median_us"] / dense["median_us"], palu["p90_us"] / dense["p90_us"]
            verdict = "PASS" if median <= TARGET else "FAIL"
            lines.append(f"- [{verdict}] {workload} workload, {kind} calls: median {median:.2f}x "
                         f"({palu['median_us']:.1f} vs {dense['median_us']:.1f} us), p90 {p90:.2f}x")
        else:
            lines.append(f"- [n/a] {workload} workload, {kind} calls: missing rows")
    for backend, error in result.get("errors", {}).items():
        lines.append(f"- {backend}: error: {error}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "measure":  # internal: one backend
        measure_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(checkpoints.SHAPES))
    parser.add_argument("--dtype", default=None, help="default: the shape's (tiny: float32)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="root of the config-only checkpoints (default: under the temp dir)")
    parser.add_argument("--kv-ratio", type=float, default=0.5)
    parser.add_argument("--dense-backend", default="FLASH_ATTN", help="'auto' leaves vLLM's choice (CPU)")
    parser.add_argument("--decode", default="8,256,32", help="N,PROMPT,OUTPUT (default %(default)s)")
    parser.add_argument("--mixed", default="8,256,32,4096",
                        help="N,PROMPT,OUTPUT decoding requests plus one LONG prompt chunked beside them "
                             "(default %(default)s)")
    parser.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens (default %(default)s)")
    parser.add_argument("--kv-memory", type=parse_bytes, default="4GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-args", default="{}", help="JSON of extra engine arguments")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per backend")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole call")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile a repeat of each measured run (top functions by own time, into the logs)")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    args.out = args.out.resolve()
    run(args)


if __name__ == "__main__":
    main()
