#!/usr/bin/env python3
"""Generate with the 4-bit base + a QLoRA adapter for a headline given on the command line.

Usage, from the repository root after ``axolotl train configs/qlora.yml``::

    python examples/generate.py "Calderon Retail relocates head office to Madrid"
    python examples/generate.py --no-adapter "..."        # the base alone, for comparison
    python examples/generate.py --raw "Shares of Foxley"  # the text as the whole prompt

The headline is wrapped in the Alpaca prompt the tiny job trains on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluate_headlines import DEFAULT_ADAPTER, DEFAULT_BASE, alpaca_prompt, generate_answer, load_base, with_adapter


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="+", help="one or more headlines (or prompts with --raw)")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    parser.add_argument("--no-adapter", action="store_true", help="use the base model alone")
    parser.add_argument("--raw", action="store_true", help="use the text as the prompt, without the Alpaca wrapper")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    model, tokenizer = load_base(args.base)
    if not args.no_adapter:
        model = with_adapter(model, args.adapter)
    answers = []
    for text in args.prompt:
        prompt = text if args.raw else alpaca_prompt(text)
        answer = generate_answer(model, tokenizer, prompt, args.max_new_tokens).strip()
        print(f"{text}\n  -> {answer}")
        answers.append(answer)
    return answers


if __name__ == "__main__":
    main()
