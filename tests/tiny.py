"""Tiny real models and data for the tests: built from configs, never downloaded."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "the cat sat on the mat and looked at the red door",
    "a green frog jumps over the quiet pond at night",
    "seven blue birds sing near the old stone bridge",
    "my brother reads a long book about distant stars",
    "the baker sells warm bread every morning in town",
    "rain falls on the roof while the children sleep",
    "an orange fox runs across the snowy field today",
    "she plays the violin for her friends after dinner",
]


def train_tokenizer(directory: Path, texts: list[str] = SENTENCES) -> PreTrainedTokenizerFast:  # noqa: F821
    """A word-level tokenizer trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    return fast


def tiny_llama(directory: Path, vocab_size: int, seed: int = 0) -> Path:
    """Save a randomly initialised two-layer Llama to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def tiny_llama_with_tokenizer(directory: Path) -> Path:
    """A tiny Llama and its trained tokenizer in one directory."""
    tokenizer = train_tokenizer(directory)
    return tiny_llama(directory, vocab_size=len(tokenizer))
