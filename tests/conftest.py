from __future__ import annotations

import os
import sys
from pathlib import Path

# The Triton kernel tests run under the interpreter on machines without a GPU (and on the GPU machine, at full size,
# on the GPU). The switch must be on before the first `import triton` anywhere in the session (triton.language's own
# jit helpers are decorated at import); importing torch does not import Triton.
import torch  # noqa: E402

os.environ.setdefault("PALU_KERNEL_TESTS_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if os.environ["PALU_KERNEL_TESTS_DEVICE"] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHITECTURES, build_checkpoint, corpus_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared is there for CI and developers only; tests that need its data skip without it.
SHARED_DATA = Path(os.environ.get("PALU_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_checkpoint(root / name, name) for name in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture(scope="session")
def wikitext() -> Path:
    directory = SHARED_DATA / "wikitext2"
    if not (directory / "calib.txt").is_file():
        pytest.skip(f"WikiText-2 split not found at {directory} (it lives in ../shared, which CI provides)")
    return directory
