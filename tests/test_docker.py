"""Static checks of docker/Dockerfile (no Docker engine on the build machine)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def instructions(keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(keyword + " ")]


def test_base_image_is_the_pinned_vllm_release():
    (base,) = instructions("FROM")
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", base)
    assert match, f"base image must be vLLM's OpenAI image pinned to a release, got {base}"
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert gpu_extra == [f"vllm>={match[1]}.{match[2]},<{match[1]}.{int(match[2]) + 1}"]


def test_plugin_is_installed_without_touching_vllm():
    run = " ".join(instructions("RUN"))
    assert "pip install --no-cache-dir --no-deps /opt/vllm-palu" in run
    copied = [shlex.split(line)[:-1] for line in instructions("COPY")]
    assert ["vllm_palu"] in copied and "pyproject.toml" in sum(copied, [])


def test_entry_command_serves_the_mounted_checkpoint_with_palu():
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["vllm", "serve", "/model", "--attention-backend", "PALU"]
    (cmd,) = instructions("CMD")
    assert json.loads(cmd) == ["--host", "0.0.0.0", "--port", "8000"]
