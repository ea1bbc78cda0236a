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
    """Stands in for a compiled kernel: records what each direct launch passes."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


@pytest.fixture
def toy(monkeypatch):
    """The toy kernel as a real JITFunction (whatever TRITON_INTERPRET says), its JIT run recording its calls."""
    kernel = JITFunction(toy_kernel, do_not_specialize=["first"])
    compiled, jit_calls = FakeCompiled(), []

    def run(*args, grid, warmup, **kwargs):
        jit_calls.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(kernel, "run", run)
    return kernel, compiled, jit_calls


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
    assert grid == (5, 2) and len(passed) == len(bound)
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
