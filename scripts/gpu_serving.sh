#!/usr/bin/env bash
# The serving work of one GPU lease, in real vLLM 0.33 (torch 2.14, triton 3.8) brought over with
# ../shared/gpu-stack (staged in /root/stage by the device tool, see ../shared/gpu-stack/README.md). One device call
# per phase, in this order, on one machine:
#
#   bash scripts/gpu_serving.sh tests     install the stack into /tmp/site (once per machine); a smoke test of
#                                         every launcher (fails: the later phases stop at once); kernel tests at full
#                                         size (the FlashAttention prefill path included; KERNEL_TESTS: a pytest
#                                         -k expression to run fewer); bf16 serving against
#                                         FLASH_ATTN and the fp32 reference, CUDA graphs, no late JIT compiles
#   bash scripts/gpu_serving.sh serving-gpu  tests/test_serving_gpu.py alone (five bf16 engines: ~400 s)
#   bash scripts/gpu_serving.sh serving   `vllm serve` over HTTP (8 concurrent requests); offline LLM on CUDA
#                                         (chunked prefill, preemption, prefix caching)
#   bash scripts/gpu_serving.sh serve     end-to-end benchmark (benchmarks/serve.py): dense bf16 and PALU kv 0.5 /
#                                         0.25 engines; host time per attention call (benchmarks/host_time.py)
#   bash scripts/gpu_serving.sh host      host time per attention call alone, by launcher, and its cProfile
#   bash scripts/gpu_serving.sh extra     the fp8 configurations (dense fp8 KV, PALU fp8 latents) into the same
#                                         results; `vllm serve` + `vllm bench serve`; the kernel microbenchmark
#   bash scripts/gpu_serving.sh http      `vllm serve` + `vllm bench serve` alone, dense bf16 and PALU kv 0.5 (~100 s
#                                         a server: start-up, then 64 x 1024 -> 256 random requests)
#   bash scripts/gpu_serving.sh kernels   decode-kernel variants on the accurate layouts (joint key groups, shared
#                                         latents) against dense decode (benchmarks/attention_kernels.py tune;
#                                         TUNE_CASES: its --cases, e.g. "gs 1 b16 16K" for the long decode alone)
#   bash scripts/gpu_serving.sh mha       end-to-end benchmark at Llama-2-7B shapes (MHA: 32 KV heads, 512 KiB of
#                                         dense KV a token): dense bf16, PALU kv 0.5 per head and groups of 2
#                                         (MHA_CONFIGS), long decode 16 x 8192 -> 256 and capacity 2048 -> 1024 at
#                                         64 GiB of KV (MHA_ARGS override), in their own results directory
#   bash scripts/gpu_serving.sh groups    end-to-end benchmark of PALU split over groups of 2 heads (the
#                                         converter's Llama-3-8B default) and per head against dense bf16: long
#                                         decode, capacity at 4K -> 2K (GROUPS_CONFIGS, GROUPS_WORKLOADS, GROUPS_ARGS
#                                         override), each with device time by kernel over PROFILE_STEPS (10) steady
#                                         decode steps
#
# The device tool can refuse a machine, and each refused call of a batch still costs device time (2026-12-03: 25
# refusals, 541 s; one more later, 90 s): make the first call (nvidia-smi) alone, and issue the rest only once it has
# run. It hands an idle machine back after ~30 s: issue the staging calls and every phase in one batch of
# tool calls, with no pause between them, and keep each call's BUDGET within the session's device time left (a call
# killed by the lease's end brings back nothing of the step it was in). The host phase needs ~250 s (two engines).
# Each step is time-boxed within the phase's BUDGET (one device call runs at most 600 s); logs land in $OUT (what the
# device tool brings back) as one tarball, refreshed after every step, plus summary-PHASE.txt, also printed.
# Device calls: stage the pieces as the gpu-stack README says (and run scripts/gpu_stack_extra.sh here first), then
# name `.gpu-stack/bin` in `carry` of every phase's call (a later staging call does not keep it in the tree).
# Measured on 2026-12-01: a staging call takes ~5 s; the install 24 s; under triton 3.8 the kernel tests take more than
# 150 s (first compiles) and each bf16 test engine about 60 s to start (torch.compile, CUDA graphs). A 30-minute lease
# (2026-12-04 01:55: machine start ~65 s, 21 staging calls ~90 s) holds about 1,600 s of phases, e.g. (measured): tests
# with KERNEL_TESTS narrowed to what changed (the smoke test 21 s, 55 full-size tests ~220 s), serving-gpu (two of its
# four tests in 300 s), groups with GROUPS_WORKLOADS=capacity (dense ~160 s, each PALU engine ~140 s), host (~150 s),
# kernels (~95 s). 2026-12-04 04:39 and 14:16: serving 401 s (HTTP 120 s, offline 245 s); extra's two fp8 engines
# ~130 s each; groups with dense-bf16,palu-0.5 over all four workloads at PROFILE_STEPS=10 448 s, palu-0.5-g2 over
# long-decode,capacity 208 s; http 284 s (a server ~140 s, ~90 s of it start-up: give it BUDGET >= 330). A tests call
# under BUDGET 130 reaches only the install and the smoke test. A machine that goes cold mid-batch (idle > 30 s)
# takes ~100 s to stage again.
set -uo pipefail
phase=${1:?usage: gpu_serving.sh tests|serving-gpu|serving|serve|host|extra|http|kernels|groups|mha}
OUT=${OUT:-results/gpu}
BUDGET=${BUDGET:-570}  # seconds for the whole phase: one device call runs at most 600
logs=/tmp/palu-gpu/$phase
results=/tmp/palu-gpu/results  # benchmark results shared by the phases (serve.json gains rows phase by phase)
mkdir -p "$OUT" "$logs" "$results"
summary=$OUT/summary-$phase.txt

step() {  # step NAME SECONDS COMMAND...: run within what is left of the budget, log to $logs/NAME.log
    local name=$1 seconds=$2
    shift 2
    local left=$((BUDGET - SECONDS - 15))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left} s of the budget left" | tee -a "$summary"
        return
    fi
    [ "$seconds" -gt "$left" ] && seconds=$left
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" > "$logs/$name.log" 2>&1
    local status=$?
    { echo "== $name: exit $status after $((SECONDS - start)) s (limit $seconds s)"; tail -n 12 "$logs/$name.log"; } \
        | tee -a "$summary"
    tar -czf "$OUT/$phase.tar.gz" -C /tmp/palu-gpu "$phase" results  # after every step: survives a kill
    return $status
}

if [ ! -d /tmp/site/vllm ]; then
    # A refused staging transfer leaves a piece missing, and the install then breaks torch (2026-12-02: NCCL).
    staged=$(ls /root/stage 2> /dev/null | wc -l)
    if [ "$staged" -lt 23 ]; then
        echo "error: $staged of the 23 stack pieces are in /root/stage; stage the rest first" | tee -a "$summary"
        exit 3
    fi
    # The image has no unzip, which the stack's install.sh calls as `unzip -p WHEEL MEMBER`.
    if ! command -v unzip > /dev/null; then
        mkdir -p /tmp/palu-gpu/bin
        printf '#!/usr/bin/env python3\nimport sys, zipfile\nwheel, member = [a for a in sys.argv[1:] if a != "-p"]\n%s\n' \
            'sys.stdout.buffer.write(zipfile.ZipFile(wheel).read(member))' > /tmp/palu-gpu/bin/unzip
        chmod +x /tmp/palu-gpu/bin/unzip
        export PATH=/tmp/palu-gpu/bin:$PATH
    fi
    step install 200 bash .gpu-stack/bin/install.sh
    # What `vllm serve` imports beyond the shared stack (scripts/gpu_stack_extra.sh, run here before staging).
    if ls .gpu-stack/bin/extra/*.whl > /dev/null 2>&1; then
        step install-extra 60 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            .gpu-stack/bin/extra/*.whl
    fi
fi
source .gpu-stack/bin/env.sh
# The tests phase starts with a smoke test of every launcher (compiled once, then launched directly, on the GPU);
# where it fails, the tree is broken on this stack and the later phases of the batch stop at once instead of
# spending the lease on engines that cannot start (2026-12-03: one grid bug cost a whole lease's benchmarks).
stop=/tmp/palu-gpu/STOP
if [ "$phase" != tests ] && [ -f "$stop" ]; then
    echo "== $phase: skipped: $(cat "$stop")" | tee -a "$summary"
    exit 4
fi
export PALU_KERNEL_TESTS_DEVICE=cuda PALU_TEST_REPORT_DIR=$logs/report VLLM_CPU_KVCACHE_SPACE=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee -a "$summary"
python3 -c "import torch, triton, vllm; print(torch.__version__, triton.__version__, vllm.__version__)" 2>&1 \
    | tail -1 | tee -a "$summary"

# The same engine settings for every benchmark configuration: fewer CUDA-graph sizes than vLLM's default, for
# start-up time (identical for dense and PALU).
ENGINE='{"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 288]}}'
SERVE_ARGS=${SERVE_ARGS:---capacity 0,1024,512}  # capacity: half the default output, to fit the call
case $phase in
tests)  # in order of what the rest depends on; each later step gets what is left of the budget
    rm -f "$stop"
    if ! step smoke 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k launches_after; then
        echo "the smoke test failed in the tests phase (tests.tar.gz: tests/smoke.log)" | tee "$stop"
        exit 4
    fi
    # The modules `vllm serve` and `vllm bench serve` import at start-up: a missing one fails here in seconds,
    # not in each server test after its engine has started.
    step serve-imports 60 python3 -c "import vllm.entrypoints.launchers.api_server.entry, \
vllm.entrypoints.serve.sagemaker.api_router, model_hosting_container_standards.sagemaker, vllm.benchmarks.serve"
    step kernel-tests 400 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_kernels.py \
        -k "${KERNEL_TESTS:-}"
    step serving-gpu 300 python3 -m pytest -q -p no:cacheprovider tests/test_serving_gpu.py
    cat "$logs/report/bf16_serving.json" 2>/dev/null | tee -a "$summary"
    ;;
serving-gpu)  # SERVING_GPU_TESTS: a pytest -k expression to run fewer (the four tests take ~450 s)
    step serving-gpu $((BUDGET - 20)) python3 -m pytest -q -p no:cacheprovider tests/test_serving_gpu.py \
        -k "${SERVING_GPU_TESTS:-}"
    cat "$logs/report/bf16_serving.json" 2>/dev/null | tee -a "$summary"
    ;;
serving)
    step serving-http 200 python3 -m pytest -q -p no:cacheprovider tests/test_server.py
    step serving-offline 330 python3 -m pytest -q -p no:cacheprovider tests/test_serving_offline.py \
        -k "chunked or attention_reads"
    ;;
serve)
    step serve 330 python3 benchmarks/serve.py run --out "$results/serve" --deadline 320 \
        --configs dense-bf16,palu-0.5,palu-0.25 --engine-args "$ENGINE" $SERVE_ARGS
    step host-time 200 python3 benchmarks/host_time.py --out "$results/host" ${HOST_ARGS:-}
    ;;
host)
    step host-time $((BUDGET - 20)) python3 benchmarks/host_time.py --out "$results/host" ${HOST_ARGS:---profile}
    ;;
kernels)
    step tune $((BUDGET - 60)) python3 -m benchmarks.attention_kernels tune --deadline $((BUDGET - 130)) \
        --out "$results/kernels" ${TUNE_CASES:+--cases "$TUNE_CASES"}
    ;;
groups)  # capacity-bound at the issue's decode-heavy shape: 4K -> 2K, 1.9x the dense KV cache (86 requests)
    step serve-groups $((BUDGET - 40)) python3 benchmarks/serve.py run --out "$results/serve" \
        --deadline $((BUDGET - 50)) --configs "${GROUPS_CONFIGS:-dense-bf16,palu-0.5-g2,palu-0.5}" \
        --workloads "${GROUPS_WORKLOADS:-long-decode,capacity}" --engine-args "$ENGINE" \
        --profile-steps "${PROFILE_STEPS:-10}" ${GROUPS_ARGS:---capacity 0,4096,2048}
    step report 20 python3 benchmarks/serve.py report "$results/serve"
    ;;
mha)  # Llama-2-7B: 64 GiB of KV holds 131,072 dense tokens, i.e. 16 x 8K; the capacity run is 1.9x that
    step serve-mha $((BUDGET - 40)) python3 benchmarks/serve.py run --shape llama2-7b --out "$results/serve-mha" \
        --deadline $((BUDGET - 50)) --configs "${MHA_CONFIGS:-dense-bf16,palu-0.5,palu-0.5-g2}" \
        --workloads long-decode,capacity --engine-args "$ENGINE" --profile-steps "${PROFILE_STEPS:-10}" \
        ${MHA_ARGS:---kv-memory 64GiB --long-decode 16,8192,256 --capacity 0,2048,1024}
    step report 20 python3 benchmarks/serve.py report "$results/serve-mha"
    ;;
extra)
    step serve-fp8 230 python3 benchmarks/serve.py run --out "$results/serve" --deadline 220 \
        --configs dense-fp8,palu-0.5-fp8 --engine-args "$ENGINE" $SERVE_ARGS
    step serve-http 200 python3 benchmarks/serve.py http --out "$results/serve" --engine-args "$ENGINE"
    step report 20 python3 benchmarks/serve.py report "$results/serve"
    step kernels 110 python3 -m benchmarks.attention_kernels kernels --quick --out "$results/kernels"
    ;;
http)
    step serve-http $((BUDGET - 40)) python3 benchmarks/serve.py http --out "$results/serve" \
        --deadline $((BUDGET - 50)) --engine-args "$ENGINE" ${HTTP_ARGS:-}
    step report 20 python3 benchmarks/serve.py report "$results/serve"
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
tail -c 11000 "$summary"
