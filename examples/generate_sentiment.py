#!/usr/bin/env python3
"""Ask SmolLM2-135M-Instruct (4-bit base + the QLoRA adapter of ``make train``) for the sentiment of texts.

Usage, from the repository root after ``make train``::

    python examples/generate_sentiment.py "The battery died after two days and support never answered."
    python examples/generate_sentiment.py --no-adapter "..."   # the base alone, zero-shot

Each text is sent as the chat the adapter was trained on (the instruction as system
message, the text as user message, the tokenizer's chat template); the reply is greedy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluate_sentiment import (
    DEFAULT_ADAPTER,
    DEFAULT_BASE,
    TRAIN_COMMAND,
    greedy_reply,
    load_base,
    text_prompt,
    with_adapter,
)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="+", help="one or more texts")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    parser.add_argument("--no-adapter", action="store_true", help="use the base model alone")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    args = parser.parse_args(argv)

    if not (args.base / "config.json").is_file():
        parser.exit(2, f"error: no model at {args.base}. Prepare it first: {TRAIN_COMMAND}\n")
    model, tokenizer = load_base(args.base)
    if not args.no_adapter:
        model = with_adapter(model, args.adapter, TRAIN_COMMAND)
    answers = []
    for text in args.text:
        answer = greedy_reply(model, tokenizer, text_prompt(tokenizer, text), args.max_new_tokens)
        print(f"{text}\n  -> {answer}")
        answers.append(answer)
    return answers


if __name__ == "__main__":
    main()
