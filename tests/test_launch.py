"""CompiledLaunch against Triton's own JIT (the API it pins: vllm_palu/attention/launch.py), on the build machine:
a launch after the first passes the compiled kernel every parameter in the order Triton's binder binds them, and a
key hit happens only where the JIT would have chosen the same binary. The GPU run of the real launchers:
tests/test_kernels.py::test_launches_after_the_first_skip_the_jit."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from vllm_palu.attention.launch import CompiledLaunch  # noqa: E402


def toy_kernel(x_ptr, n, STRIDE: tl.constexpr, first, scale, out_ptr, BLOCK: tl.constexpr,
               DTYPE: tl.constexpr, FLAG: tl.constexpr = False):
    pass  # never compiled: the JIT's run is replaced below


class FakeCompiled:
    """Stands in for a compiled kernel: records what each direct launch passes. Its grid is three axes, as triton
    3.8's ``CompiledKernel.__getitem__`` reads them (``grid[0], grid[1], grid[2]``: a shorter grid raised
    IndexError on the H200, 2026-12-03)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        grid = (grid[0], grid[1], grid[2])
        return lambda *args: self.launches.append((grid, args))


def recorded_jit(monkeypatch, fn, **options):
    """``fn`` as a real JITFunction (whatever TRITON_INTERPRET says) whose JIT run records its calls and returns a
    FakeCompiled: (kernel, compiled, jit_calls)."""
    kernel = JITFunction(fn, **options)
    compiled, jit_calls = FakeCompiled(), []

    def run(*args, grid, warmup, **kwargs):
        jit_calls.append((args, kwargs))
        return compiled

    monkeypatch.setattr(kernel, "run", run)
    return kernel, compiled, jit_calls


@pytest.fixture
def toy(monkeypatch):
    return recorded_jit(monkeypatch, toy_kernel, do_not_specialize=["first"])


def test_direct_launch_passes_what_the_binder_binds(toy):
    kernel, compiled, jit_calls = toy
    launch = CompiledLaunch(kernel)
    x, out = torch.empty(64), torch.empty(64)
    args = (x, 100, 128, 7, 0.5, out)
    meta = dict(BLOCK=32, DTYPE=tl.float16, num_warps=4)
    assert launch((3, 1), *args, **meta) is compiled and len(jit_calls) == 1  # first: through the JIT
    assert launch((5, 2), *args, **meta) is compiled and len(jit_calls) == 1  # then: the compiled kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, _, _ = binder(*args, **meta)
    grid, passed = compiled.launches[0]
    assert grid == (5, 2, 1) and len(passed) == len(bound)
    assert all(a is b or a == b for a, b in zip(passed, bound.values()))  # FLAG: its default, in place


def test_keys_split_where_the_jit_specializes(toy):
    kernel, compiled, jit_calls = toy
    launch = CompiledLaunch(kernel)
    x, out = torch.empty(64), torch.empty(64)
    meta = dict(BLOCK=32, DTYPE=tl.float16, num_warps=4)
    launch((1,), x, 100, 128, 7, 0.5, out, **meta)
    launch((1,), x, 100, 128, 9, 0.25, out, **meta)  # `first` is not specialized, floats are typed only: a hit
    assert len(jit_calls) == 1
    for changed in [(x[1:], 100, 128, 7, 0.5, out),  # a misaligned pointer
                    (x.half(), 100, 128, 7, 0.5, out),  # another dtype
                    (x, 16, 128, 7, 0.5, out),  # an integer the JIT specializes (divisible by 16 now)
                    (x, 100, 64, 7, 0.5, out),  # a positional constexpr
                    (x, 100, 128, 2 ** 33, 0.5, out)]:  # an unspecialized integer past i32
        launch((1,), *changed, **meta)
    launch((1,), x, 100, 128, 7, 0.5, out, **dict(meta, num_warps=8))  # an option
    assert len(jit_calls) == 7 and len(compiled.launches) == 1


def test_interpreted_kernels_launch_through_their_own_path():
    calls = []

    class Interpreted:  # what triton.jit gives under TRITON_INTERPRET=1: not a JITFunction
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(grid)

    launch = CompiledLaunch(Interpreted())
    launch((2,), 1, 2, BLOCK=4)
    launch((2,), 1, 2, BLOCK=4)
    assert calls == [(2,), (2,)] and not launch.compiled


LAUNCHES = ("launch_write_latents", "launch_write_quantized_latents", "launch_decode", "launch_rebuild_context",
            "launch_prefill_attention")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride())
    return type(a) is type(b) and a == b


def test_every_launcher_passes_what_the_binder_binds(monkeypatch):
    """The launchers of vllm_palu.attention.ops on their real kernels (as JITFunctions, their JIT run recorded):
    of a step run twice, every launch of the second goes straight to the compiled kernel and passes each parameter
    of the kernel, in order, as Triton's binder binds the launcher's call."""
    from vllm_palu.attention import ops

    recorded = {}
    for name in LAUNCHES:
        # Under TRITON_INTERPRET=1 ops holds interpreted kernels: their functions, compiled as JITFunctions.
        kernel, compiled, jit_calls = recorded_jit(monkeypatch, getattr(ops, name).kernel.fn)
        launch, calls = CompiledLaunch(kernel), []

        def recording(grid, *args, _launch=launch, _calls=calls, **meta):  # what each launcher call passed
            _calls.append((args, meta))
            return _launch(grid, *args, **meta)

        monkeypatch.setattr(ops, name, recording)
        recorded[name] = kernel, compiled, jit_calls, calls

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, rank_k, rank_v, block = 4, 2, 32, 16, 24, 16
    k_up = torch.randn(kv_heads, head_dim, rank_k, generator=generator)
    angles = torch.arange(512)[:, None] * (1e-4 ** (torch.arange(0, head_dim, 2) / head_dim))[None, :]
    plan = ops.plan_layer(k_up, None, torch.cat([angles.cos(), angles.sin()], dim=-1), True, heads, rank_v, 0.2)
    cache = torch.randn(8, kv_heads, block, rank_k + rank_v, generator=generator)
    pages = torch.zeros(8, kv_heads, block, 64, dtype=torch.uint8)  # fp8 rows of 16 + 24 codes and 2 scales
    query, out = torch.randn(11, heads, head_dim), torch.empty(11, heads, rank_v)
    query_start_loc, seq_lens = torch.tensor([0, 1, 2, 11], dtype=torch.int32), torch.tensor([40, 30, 9])
    table, slots = torch.arange(24, dtype=torch.int32).view(3, 8) % 8, torch.arange(11)
    k_latent, v_latent = torch.randn(11, kv_heads, rank_k), torch.randn(11, kv_heads, rank_v)
    scratch = ops.DecodeScratch.allocate(2 * 4, heads, rank_v, 2 * kv_heads, "cpu")  # 2 requests x 4 splits
    for _ in range(2):  # the same step twice: the second one's launches are the direct ones
        ops.write_latents(cache, slots, k_latent, v_latent)
        ops.write_latents(pages, slots, k_latent, v_latent, "fp8")
        ops.decode_attention(plan, query, cache, query_start_loc, seq_lens, table, out, 2, 4, scratch)
        ops.prefill_attention(plan, query, cache, query_start_loc, seq_lens, table, out,
                              ops.PrefillBatch(2, 1, 2, 9, 0))

    backend = make_backend(GPUTarget("cuda", 90, 32))
    for name, (kernel, compiled, jit_calls, calls) in recorded.items():
        assert jit_calls and len(compiled.launches) == len(calls) // 2, name  # the second step: all direct
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for (args, meta), (_, passed) in zip(calls[len(calls) // 2:], compiled.launches):
            bound, _, _ = binder(*args, **meta)
            assert len(passed) == len(bound) and all(same(a, b) for a, b in zip(passed, bound.values())), name
