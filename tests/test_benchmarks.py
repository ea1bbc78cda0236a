"""The serving benchmarks (benchmarks/), run end to end on the tiny shape with real vLLM: config-only checkpoints
with dummy weights, `serve run` (dense vs PALU, one engine process each), `report`, `serve http` (`vllm serve` +
`vllm bench serve`) and the host-time harness. Structure and sanity only, no speed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import checkpoints
from vllm_palu.config import PaluConfig
from vllm_palu.offline.converter import ConvertOptions, convert

REPO = Path(__file__).resolve().parents[1]
KV_MEMORY = "2MiB"  # tiny dense fp32: 1024 bytes/token -> 2048 tokens
# Smallest engines: eager, block size 32 (vLLM's CPU attention needs it for head_dim 32).
ENGINE = ["--engine-args", json.dumps({"block_size": 32, "enforce_eager": True})]
TINY = ["--shape", "tiny", "--dense-backend", "auto", "--kv-memory", KV_MEMORY, "--max-num-seqs", "64",
        "--short-decode", "4,32,16", "--long-decode", "2,512,16", "--capacity", "0,48,16", "--prefill", "4,256,1",
        *ENGINE]


def run_script(module: str, *args: str, timeout: int = 400) -> str:
    """Run a benchmark as the GPU machine will (python -m benchmarks.X from the repository root); its stdout."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_checkpoint_ranks_match_the_converter_and_tokens_round_trip(tiny_llama, tmp_path):
    """The config-only Palu checkpoint carries exactly the ranks the converter gives the same shape, and its
    tokenizer maps random ids to text and back unchanged over the whole vocabulary."""
    built = checkpoints.build("tiny", tmp_path / "palu", kv_ratio=0.5)
    dense = checkpoints.build("tiny", tmp_path / "dense")
    converted = convert(ConvertOptions(model=str(tiny_llama), output=tmp_path / "converted", kv_ratio=0.5, latent_layout="split",
                                       group_size="1", calib_samples=4, calib_seq_len=32, batch_size=2))
    ours = PaluConfig.of(json.loads((built / "config.json").read_text()))
    theirs = PaluConfig.of(json.loads((converted / "config.json").read_text()))
    for field in ("base_architecture", "num_kv_heads", "head_dim", "group_size", "k_ranks", "v_ranks"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.method["rank_alloc"] == "uniform" and ours.method["kv_ratio"] == 0.5
    config = json.loads((dense / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "palu" not in config
    assert json.loads((built / "config.json").read_text())["architectures"] == ["PaluLlamaForCausalLM"]
    assert not list(built.glob("*.safetensors")) and not list(tmp_path.glob(".*partial*"))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built)
    assert len(tokenizer) == checkpoints.SHAPES["tiny"].vocab_size
    ids = np.random.default_rng(0).integers(0, tokenizer.vocab_size, 2000)
    ids = [int(i) for i in ids if i not in tokenizer.all_special_ids]
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=True) == ids


def test_serve_run_writes_rows_table_and_plot_and_report_rebuilds_them(tmp_path):
    out = tmp_path / "serve"
    stdout = run_script("benchmarks.serve", "run", "--out", str(out), "--configs", "dense-bf16,palu-0.5",
                        "--checkpoints", str(tmp_path / "ckpt"), *TINY)
    assert "capacity: 61 x (48 + 16) tokens = 1.91x the dense float32 KV capacity" in stdout
    data = json.loads((out / "serve.json").read_text())
    rows = {(r["config"], r["workload"]): r for r in data["rows"]}
    assert sorted(rows) == sorted((c, w) for c in ("dense-bf16", "palu-0.5")
                                  for w in ("short-decode", "long-decode", "capacity", "prefill"))
    for (config, workload), row in rows.items():
        assert row["status"] == "ok", row
        assert row["output_tokens"] == row["requests"] * row["output_len"]
        assert row["prompt_tokens"] == row["requests"] * row["prompt_len"]
        assert row["wall_s"] > 0 and row["output_tok_s"] > 0 and row["total_tok_s"] > row["output_tok_s"]
        assert row["ttft_median_ms"] > 0 and row["metrics_missing"] == 0 and row["preemptions"] >= 0
        assert row["attention_backends"] == (["PALU"] if config.startswith("palu") else ["CPU_ATTN"])
        assert row["jit_lines"] >= 0 and row["cudagraph_mode"]
        assert "gpu_sm_mhz" not in row  # no nvidia-smi here: no clock samples, and the table says n/a
        if row["output_len"] > 1:
            assert 0 < row["tpot_median_ms"] and 0 < row["decode_tpot_ms"]
    assert rows[("dense-bf16", "capacity")]["requests"] == 61  # 1.9 x 2048 dense tokens / (48 + 16)
    dense, palu = rows[("dense-bf16", "short-decode")], rows[("palu-0.5", "short-decode")]
    assert dense["kv_capacity_tokens"] >= 2000  # 2 MiB of fp32 K+V (block rounding aside)
    assert 1.9 <= palu["kv_capacity_tokens"] / dense["kv_capacity_tokens"] <= 2.1
    markdown = (out / "serve.md").read_text()
    assert "| palu-0.5 | capacity |" in markdown and "capacity palu-0.5 vs dense-bf16: output_tok_s ratio" in markdown
    assert "| palu-0.5 | dense-bf16 |" in markdown and (out / "serve.png").stat().st_size > 0
    assert (out / "dense-bf16.log").is_file() and (out / "palu-0.5.log").is_file()

    (out / "serve.md").unlink()
    (out / "serve.png").unlink()
    assert "| dense-bf16 | prefill |" in run_script("benchmarks.serve", "report", str(out))
    assert (out / "serve.md").read_text() == markdown and (out / "serve.png").is_file()


def test_serve_table_gives_each_run_its_sm_clock():
    """A timed run's SM clock (nvidia-smi's median over it) and largest power draw, flagged where the power cap
    throttled the clock; "n/a" for rows without samples."""
    from benchmarks import serve

    assert serve.clock_text({"gpu_sm_mhz": 1755.0, "gpu_watts": 690.4, "gpu_power_capped": True}) == \
        "1755 (690 W, capped)"
    assert serve.clock_text({"gpu_sm_mhz": 1980.0, "gpu_watts": 410.0, "gpu_power_capped": False}) == "1980 (410 W)"
    assert serve.clock_text({"wall_s": 1.0}) == "n/a"


def test_serve_run_records_timeouts_and_deadline_skips(tmp_path):
    """A configuration that runs out of time leaves error rows and the run goes on; past the deadline nothing
    starts; the JSON and the report exist either way."""
    out = tmp_path / "serve"
    common = ["--out", str(out), "--workloads", "short-decode", "--checkpoints", str(tmp_path / "c"), *TINY]
    run_script("benchmarks.serve", "run", "--configs", "palu-0.5", "--config-timeout", "2", *common)
    rows = json.loads((out / "serve.json").read_text())["rows"]
    assert [(r["config"], r["status"]) for r in rows] == [("palu-0.5", "error")]
    assert rows[0]["error"] == "timeout after 2 s" and "error: timeout" in (out / "serve.md").read_text()

    run_script("benchmarks.serve", "run", "--configs", "dense-bf16", "--deadline", "0", *common)
    rows = json.loads((out / "serve.json").read_text())["rows"]  # same settings: palu-0.5's rows are kept
    assert [(r["config"], r["error"]) for r in rows] == [("palu-0.5", "timeout after 2 s"),
                                                         ("dense-bf16", "skipped: deadline reached")]


def test_serve_run_profiles_steady_decode_steps(tmp_path):
    """--profile-steps: after the timed workload each engine runs it again under vLLM's torch profiler for that many
    steps past every prefill, and its row holds the device (here: host-op) time per step by kernel group."""
    out = tmp_path / "serve"
    run_script("benchmarks.serve", "run", "--out", str(out), "--configs", "dense-bf16,palu-0.5", "--workloads",
               "short-decode", "--checkpoints", str(tmp_path / "ckpt"), *TINY, "--short-decode", "4,32,24",
               "--profile-steps", "4")
    rows = json.loads((out / "serve.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["dense-bf16", "palu-0.5"]
    for row in rows:
        profile = row["step_profile"]
        assert "error" not in profile, profile
        assert profile["steps"] == 4 and profile["first_step"] >= 9 and profile["source"] in ("kernel", "cpu_op")
        assert profile["step_us"] > 0 and abs(sum(profile["groups_us"].values()) - profile["step_us"]) < 1e-3 * \
            profile["step_us"]
        assert profile["top_kernels_us"] and all(us > 0 for _, us in profile["top_kernels_us"])
        assert list((out / "profile" / row["config"]).glob("short-decode-*.pt.trace.json*"))
    assert "Device time per steady decode step" in (out / "serve.md").read_text()


def test_serve_http_runs_vllm_bench_serve_against_both_servers(tmp_path):
    out = tmp_path / "http"
    run_script("benchmarks.serve", "http", "--out", str(out), "--http-workload", "8,64,16",
               "--checkpoints", str(tmp_path / "ckpt"), *TINY)
    rows = json.loads((out / "http.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["dense-bf16", "palu-0.5"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["completed"] == 8 and row["failed"] == 0 and row["total_output_tokens"] == 8 * 16
        assert row["output_throughput"] > 0 and row["median_ttft_ms"] > 0
    assert "## HTTP" in (out / "serve.md").read_text()


def test_host_time_measures_both_backends(tmp_path):
    out = tmp_path / "host"
    stdout = run_script("benchmarks.host_time", "--out", str(out), "--shape", "tiny", "--dense-backend", "auto",
                        "--decode", "4,64,8", "--mixed", "4,64,24,1024", "--chunk", "128", "--kv-memory", "8MiB",
                        "--checkpoints", str(tmp_path / "ckpt"), "--engine-args", json.dumps({"block_size": 32}),
                        "--profile")
    result = json.loads((out / "host_time.json").read_text())
    assert result["errors"] == {}
    rows = {(r["backend"], r["workload"], r["class"]): r for r in result["rows"]}
    for backend, impl in (("dense", "CPUAttentionBackendImpl"), ("palu", "PaluAttentionImpl")):
        for workload, kind in (("decode", "decode"), ("mixed", "mixed"), ("mixed", "decode")):
            row = rows[(backend, workload, kind)]
            assert row["calls"] > 0 and row["calls"] % 2 == 0  # every step calls both layers
            assert 0 < row["median_us"] <= row["p90_us"] and row["attention_impls"] == [impl]
    # vLLM's CPU attention writes its cache in a separate call; PALU writes inside forward.
    assert rows[("dense", "decode", "decode")]["separate_write_median_us"] > 0
    assert rows[("palu", "decode", "decode")]["separate_write_median_us"] == 0
    assert "decode workload, decode calls: median" in stdout and (out / "host_time.md").is_file()
    for backend in ("dense", "palu"):  # --profile: each backend's log holds the cProfile of a repeat run
        assert "cProfile of a repeat run" in (out / f"host-{backend}.log").read_text()


def test_tune_pairs_each_case_with_the_dense_decode_of_its_shape(tmp_path):
    """The tune times cases of two shapes per model (batch 16 x 32K, the served capacity run's 86 x 5K): each is
    compared, in its plot, with dense decode of its own shape."""
    from benchmarks import attention_kernels

    served, long = attention_kernels.TUNE_SERVED_CASE, attention_kernels.TUNE_CASES[0]
    assert attention_kernels.shape(served.name) == "llama3-8b b86 5K"
    assert attention_kernels.shape(long.name + " fp8 latents") == "llama3-8b b16 32K"
    rows = [{"case": "llama3-8b dense b16 32K", "cudnn_us": 476.0},
            {"case": "llama3-8b dense b86 5K", "cudnn_us": 800.0},
            {"case": long.name, "default": True, "us": 433.0, "floor_us": 250.0},
            {"case": served.name, "default": True, "us": 330.0, "floor_us": 170.0}]
    attention_kernels.plot_tune(rows, tmp_path / "tune.png")
    assert (tmp_path / "tune.png").stat().st_size > 10_000


def test_tune_runs_only_the_cases_asked_for():
    """``tune --cases`` keeps the cases whose names contain one of the strings (the fp8 case by its suffix), each
    with its plan default first, and refuses a filter that matches nothing."""
    from benchmarks import attention_kernels

    runs = attention_kernels.tune_runs(["gs 1 b16 16K", "fp8 latents"])
    assert [(run[0][0].name, run[0][1]) for run in runs] == [
        (attention_kernels.TUNE_FP8_CASE.name, "fp8"), ("llama3-8b kv 0.5 gs 1 b16 16K ranks 40/88", "auto"),
        ("llama3-8b kv 0.5 gs 1 b16 16K", "auto")]  # the served checkpoint's ranks, then tile-exact ones
    assert attention_kernels.TUNE_LONG_TILE_EXACT_CASE.ranks == (48, 80)
    assert all(run[0][2] == {} for run in runs)
    assert len(attention_kernels.tune_runs()) == len(attention_kernels.TUNE_CASES) + 5
    with pytest.raises(ValueError, match="no tune case"):
        attention_kernels.tune_runs(["gs 3"])
