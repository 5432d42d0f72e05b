"""Tiny models of each family GGUF export supports, with real tokenizers, built from configs (no hub).

Every family gets random float32 weights (norm weights too, so that Gemma's ``1 + w`` matters),
two or more layers, grouped-query attention and a tokenizer of the kind its real models ship:
byte-level BPE split by Llama 3's or Qwen's rule, or SentencePiece-style BPE (``▁`` and byte
fallback) for Mistral and Gemma. Chat templates in the family's format go with them.
"""

from __future__ import annotations

from pathlib import Path

from tiny import SENTENCES

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"  # numbers in runs of up to three
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [*SENTENCES, "Shares of Foxley Mining rose 12% in 2024!", "The user asked: what's 7 + 35?\nThe answer is 42."]

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are tiny.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n{{ system }}<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def byte_level_tokenizer(directory: Path, split: str, specials: list[str], template: str, **roles: str) -> int:
    """A byte-level BPE (GPT-2 bytes, text split by ``split``) trained on a few sentences; returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)
    fast.chat_template = template
    fast.save_pretrained(directory)
    return len(fast)


def sentencepiece_tokenizer(directory: Path, specials: list[str], template: str, prefix: bool, **roles: str) -> int:
    """A SentencePiece-style BPE (spaces as ``▁``, ``<0xNN>`` byte fallback) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token=specials[0], byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_tokens)
    tokenizer.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)
    fast.chat_template = template
    fast.save_pretrained(directory)
    return len(fast)


def _sharpen(model) -> None:
    """Random norm weights (Gemma's are offsets from 1), and queries and keys ten times init's size: sharp
    attention, so that a wrong RoPE layout or position changes the output clearly."""
    import torch

    gemma = "gemma" in type(model).__name__.lower()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.3, 0.3) if gemma else param.uniform_(0.7, 1.3)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(10)


def family_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny model of ``family`` (llama, mistral, qwen2, qwen3, gemma2, gemma3) with its tokenizer."""
    import torch
    import transformers as tf

    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if family in ("qwen2", "qwen3"):
        size = byte_level_tokenizer(
            directory, QWEN_SPLIT, chatml, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
    elif family == "llama":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        size = byte_level_tokenizer(
            directory, LLAMA3_SPLIT, specials, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
        )
    elif family == "mistral":
        size = sentencepiece_tokenizer(
            directory, ["<unk>", "<s>", "</s>"], MISTRAL, True, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
    else:
        specials = ["<unk>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
        size = sentencepiece_tokenizer(
            directory,
            specials,
            GEMMA,
            False,
            unk_token="<unk>",
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
        )
    shape = dict(
        vocab_size=size + 3,  # a few rows more than tokens, as real models pad their embedding
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "llama":
        config = tf.LlamaConfig(
            **shape,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    elif family == "mistral":
        config = tf.MistralConfig(**shape, head_dim=16, sliding_window=None)
    elif family == "qwen2":
        config = tf.Qwen2Config(**shape, tie_word_embeddings=True)
    elif family == "qwen3":
        config = tf.Qwen3Config(**shape, head_dim=24, tie_word_embeddings=True)
    elif family == "gemma2":
        config = tf.Gemma2Config(**shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            **{**shape, "num_hidden_layers": 7}, head_dim=16, query_pre_attn_scalar=16, sliding_window=8
        )
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.float32)
    _sharpen(model)
    model.save_pretrained(directory)
    return directory


# what llama.cpp's graphs hard-code about routing (tools/gguf_arch.py): Qwen3-MoE renormalises the top-k weights
MOE_EXPORTABLE = {"qwen3_moe": {"norm_topk_prob": True}, "qwen2_moe": {}, "mixtral": {}}


def moe_family_model(family: str, directory: Path, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny mixture-of-experts model of ``family`` (:mod:`tiny_moe`'s shapes: 4 experts, top-2) with a
    tokenizer llama.cpp reads: Qwen's byte-level BPE for the Qwen families, SentencePiece-style for Mixtral."""
    import torch
    from tiny_moe import moe_model

    if family == "mixtral":
        size = sentencepiece_tokenizer(
            directory, ["<unk>", "<s>", "</s>"], MISTRAL, True, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
    else:
        chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        size = byte_level_tokenizer(
            directory, QWEN_SPLIT, chatml, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
    model = moe_model(family, vocab_size=size, seed=seed, **{**MOE_EXPORTABLE[family], **overrides})
    _sharpen(model)
    with torch.no_grad():  # routers as large as the experts' weights: clear, varied choices of the top two
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return directory
