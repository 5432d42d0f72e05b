#!/usr/bin/env python3
"""Pretrain the tiny Llama base shipped in ``examples/assets/tiny-llama`` on CPU.

Steps, all seeded:

1. Generate unlabeled English text about fictional companies: news items
   (a headline line built from the event phrasings of ``make_headlines.py``,
   then a body of market-reaction sentences) and prose paragraphs, using a
   company pool that neither the train nor the test split uses.  There is no
   instruction/response format and no "label:" pattern, so the base alone does
   not know the classification task; it only learns what good, bad and routine
   company news look like.
2. Train a BPE tokenizer (Metaspace, like Llama's
   SentencePiece) with the ``tokenizers`` library and wrap it as a
   ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>``/``<unk>``.
3. Pretrain a ~1M-parameter ``LlamaForCausalLM`` with next-token prediction
   and save it (bf16 safetensors) with its tokenizer and generation config.

Usage, from the repository root::

    python scripts/build_tiny_base.py [--out examples/assets/tiny-llama] [--steps 300]

Deterministic on one CPU thread (the default ``--threads 1``): the same seed
gives the same files. Runtime: about 190 s of CPU time (0.5-0.6 s a step plus
~10 s for corpus and tokenizer) on one core of a 2-core AMD EPYC VM; the
shipped ``build_stats.json`` records 549 s wall because that machine was shared.
The next-token loss falls from 7.3 to about 0.74 by step 250 and stays there.
Output: ~2.2 MB (bf16 safetensors 2.1 MB, tokenizer 0.1 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import time
from pathlib import Path

import torch
from make_headlines import (
    CITIES,
    EVENTS,
    INSTRUCTION,
    MONTHS,
    PRETRAIN_ROOTS,
    QUARTERS,
    SECTORS,
    fill,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# Market-reaction sentences that follow a headline of each sentiment.
REACTIONS: dict[str, tuple[str, ...]] = {
    "positive": (
        "Investors cheered the news and the shares gained {pct}%.",
        "Analysts said the results were strong and the outlook looked bright.",
        "The chief executive said demand was booming and the mood was upbeat.",
        "Traders welcomed the update and called it a positive surprise.",
        "It was a good day for shareholders, who saw the stock rally.",
        "Brokers turned more positive on the company after the news.",
    ),
    "negative": (
        "Investors worried about the news and the shares lost {pct}%.",
        "Analysts said the results were weak and the outlook looked poor.",
        "The chief executive warned that demand was falling and the mood was gloomy.",
        "Traders sold the stock and called it a negative surprise.",
        "It was a bad day for shareholders, who saw the stock slide.",
        "Brokers turned more negative on the company after the news.",
    ),
    "neutral": (
        "The shares were little changed in quiet trading.",
        "Analysts said the update did not change their view of the company.",
        "The company gave no further details and the stock barely moved.",
        "Traders called the announcement routine and stayed neutral on the stock.",
        "It was an ordinary day for shareholders, with the stock flat.",
        "Brokers kept a neutral stance on the company after the news.",
    ),
}
GENERAL = (
    "Stocks in {city} {move} on {weekday} as investors watched company results.",
    "Trading in {city} was {pace} in {month}, with {sector} shares in focus.",
    "Profit at {sector} companies {move} in the {q} quarter, data showed.",
    "Economists expect interest rates to stay on hold until {month}.",
    "The {q} quarter is usually busy for {sector} firms in {city}.",
)
MOVES = ("rose", "fell", "climbed", "slipped", "were flat", "jumped", "dropped")
PACES = ("busy", "slow", "quiet", "heavy", "calm")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n\n### Input:\n\n### Response:\n"
)


def general_sentence(rng: random.Random) -> str:
    """One sentiment-free sentence about markets in general."""
    slots = {
        "city": rng.choice(CITIES),
        "move": rng.choice(MOVES),
        "weekday": rng.choice(WEEKDAYS),
        "pace": rng.choice(PACES),
        "month": rng.choice(MONTHS),
        "sector": rng.choice(sorted(SECTORS)).lower(),
        "q": rng.choice(QUARTERS),
    }
    return rng.choice(GENERAL).format(**slots)


def event_and_reactions(rng: random.Random, n_reactions: int) -> tuple[str, str]:
    """A ``company event`` headline and ``n_reactions`` market-reaction sentences matching its sentiment."""
    sentiment = rng.choice(sorted(EVENTS))
    sector = rng.choice(sorted(SECTORS))
    headline = f"{rng.choice(PRETRAIN_ROOTS)} {sector} " + fill(rng.choice(rng.choice(EVENTS[sentiment])), rng, sector)
    picks = rng.sample(REACTIONS[sentiment], n_reactions)
    return headline, " ".join(r.format(pct=rng.randint(1, 30)) for r in picks)


def make_corpus(n_docs: int, rng: random.Random) -> list[str]:
    """Generate ``n_docs`` unlabeled documents of financial-news text.

    Half are news items (a headline line, a blank line, then a body whose
    sentences react to the headline), the rest are prose paragraphs mixing
    ``Headline. Reaction.`` sentences with general market sentences.
    """
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.5:
            headline, body = event_and_reactions(rng, rng.randint(1, 2))
            if rng.random() < 0.3:
                body += " " + general_sentence(rng)
            docs.append(f"{headline}\n\n{body}")
            continue
        sentences = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.25:
                sentences.append(general_sentence(rng))
            else:
                headline, reaction = event_and_reactions(rng, 1)
                sentences.append(f"{headline}. {reaction}")
        docs.append(" ".join(sentences))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a Llama-style (Metaspace BPE) tokenizer and wrap it for transformers.

    Newlines are split off and every word gets the ``\u2581`` prefix, so a word
    tokenizes the same at the start of a string, after a newline, or mid-sentence
    (Axolotl tokenizes the response separately from the prompt).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.Fuse(),
            decoders.Replace(" \n", "\n"),
            decoders.Replace("\n ", "\n"),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=256,
        padding_side="right",
    )


def pack(docs: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Tokenize docs as ``<s> doc </s>`` and cut the stream into ``seq_len`` blocks."""
    stream: list[int] = []
    for ids in tokenizer(docs)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)


def pretrain(
    model: LlamaForCausalLM, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> list[float]:
    """Plain AdamW next-token training with warmup + cosine decay; returns losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses = []
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(blocks), (batch,), generator=gen)
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f}s", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/assets/tiny-llama"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=30000)
    parser.add_argument("--vocab-size", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 keeps the result independent of the core count"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    docs = make_corpus(args.docs, random.Random(args.seed))
    # The tokenizer (not the model) also sees the fixed Alpaca scaffold and the
    # instruction, so those words get compact tokens.
    tokenizer = train_tokenizer(docs + [ALPACA_PREAMBLE + INSTRUCTION] * 300, args.vocab_size)
    blocks = pack(docs, tokenizer, args.seq_len)
    print(f"corpus: {len(docs)} docs, {blocks.numel()} tokens, vocab {len(tokenizer)}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    losses = pretrain(model, blocks, args.steps, args.batch, args.lr, args.seed)
    elapsed = time.time() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(args.out)
    stats = {
        "seed": args.seed,
        "docs": len(docs),
        "tokens": blocks.numel(),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "first_loss": round(losses[0], 3),
        "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 3),
        "seconds": round(elapsed),
        "threads": torch.get_num_threads(),
    }
    (args.out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
