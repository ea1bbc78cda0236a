"""Tiny random checkpoints of every supported architecture, built offline (tokenizer included)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank projections compress the key and value cache of a transformer.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A paged cache stores tokens in fixed-size blocks addressed through a block table.",
    "Rotary position embeddings rotate pairs of dimensions by an angle that grows with the position.",
    "Calibration text is tokenized and cut into windows before the singular value decomposition.",
]

# name -> (transformers config class, architecture, extra config)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def corpus_text(repeats: int = 40) -> str:
    return "\n".join(CORPUS * repeats)


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(directory)
    return fast


def build_checkpoint(directory: Path, name: str = "llama", seed: int = 0, **overrides) -> Path:
    """A 2-layer model with 4 query heads, 2 KV heads of dim 32 (vLLM's CPU attention needs >= 32; Qwen2: k/v
    biases), float32 safetensors."""
    import transformers

    config_class, architecture, extra = ARCHITECTURES[name]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    settings = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    settings.update(extra)
    settings.update(overrides)
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(torch.float32)
    with torch.no_grad():  # larger than the default init so attention is far from uniform
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.normal_(0, 0.15)
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(directory)
    return directory
