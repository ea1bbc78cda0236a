"""Launch a Triton kernel's compiled binary directly, without the JIT's per-call work.

``kernel[grid](*args, **meta)`` costs 40-50 us of host time a launch under triton 3.8 on the H200 machine (binding
and specializing ~60 arguments, a cache key, device and stream look-ups; docs/RESULTS.md, host time), and a mixed
prefill/decode step runs four of them per layer outside CUDA graphs. :class:`CompiledLaunch` goes through the JIT
once per specialization and then calls the compiled kernel itself (``CompiledKernel[grid](*every_argument)``, as
torch inductor's launchers do), keyed by what the JIT specializes on: each tensor argument's 16-byte alignment and
each integer argument's value, except the integers the kernel declares ``do_not_specialize`` (only their width,
i32 or i64), plus the constexprs and launch options. So a key hit runs the binary the JIT itself would have chosen.

Pinned to triton 3.8 (vLLM 0.33's): ``JITFunction.params`` (``name``, ``is_constexpr``, ``do_not_specialize``),
``JITFunction.signature`` and a compiled kernel's ``__getitem__(grid)(*args)`` taking a grid of three axes and
every parameter in order, constexprs included (contract tests: tests/test_launch.py; on the GPU,
tests/test_kernels.py). Under ``TRITON_INTERPRET=1`` (CPU tests) a launch is the plain ``kernel[grid](...)``.
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction


class CompiledLaunch:
    """``CompiledLaunch(kernel)(grid, *args, **meta)``: ``kernel[grid](*args, **meta)``, returning the compiled
    kernel. Arguments are positional up to some parameter and by keyword after it (constexprs and the options
    num_warps, num_stages), every later constexpr given or defaulted, each the same way on every call."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.direct = isinstance(kernel, JITFunction)  # False under the interpreter
        self.compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, parameters after the positional ones)
        self.key = None  # key(args, meta), written for the positional arguments' kinds at the first call
        self.positional = 0  # how many positional arguments it was written for

    def _write_key(self, args: tuple):
        """The key function, unrolled over the positional arguments (no per-argument branching per call): what
        the JIT's choice of binary depends on. Constexprs and specialized integers by value; tensors by dtype and
        16-byte alignment, and the first one's device (binaries are per device); integers the kernel does not
        specialize by width (i32 / i64); floats and bools by type; then the keyword constexprs and options, by
        value (a call site passes the same names). An argument of another kind than at the first call raises (a
        tensor's attributes) or splits the key."""
        parts, device = [], None
        for index, (value, param) in enumerate(zip(args, self.kernel.params)):
            item = f"args[{index}]"
            if param.is_constexpr:
                parts.append(item)
            elif isinstance(value, torch.Tensor):
                parts += [f"{item}.dtype", f"{item}.data_ptr() & 15 == 0"]
                device = device or f"{item}.device"
            elif type(value) is int:
                parts.append(f"-2147483648 <= {item} < 2147483648" if param.do_not_specialize else item)
            else:
                parts.append(f"type({item})")
        namespace = {}
        exec(f"def key(args, meta):\n    return ({device}, {', '.join(parts)}, *meta.values())\n", namespace)
        return namespace["key"]

    def __call__(self, grid: tuple, *args, **meta):
        if not self.direct:
            return self.kernel[grid](*args, **meta)
        if self.key is None:
            self.key, self.positional = self._write_key(args), len(args)
        if len(args) != self.positional:
            return self.kernel[grid](*args, **meta)
        try:
            key = self.key(args, meta)
        except (AttributeError, TypeError):  # not the kinds of arguments the key was written for
            return self.kernel[grid](*args, **meta)
        entry = self.compiled.get(key)
        if entry is not None:
            compiled, later = entry
            compiled[(*grid, 1, 1)[:3]](*args, *later)  # a compiled kernel takes no grid of fewer than 3 axes
            return compiled
        compiled = self.kernel[grid](*args, **meta)
        rest = self.kernel.params[len(args):]
        if all(p.is_constexpr for p in rest):  # else runtime arguments by keyword: always through the JIT
            defaults = self.kernel.signature.parameters
            self.compiled[key] = (compiled, tuple(meta[p.name] if p.name in meta else defaults[p.name].default
                                                  for p in rest))
        return compiled
