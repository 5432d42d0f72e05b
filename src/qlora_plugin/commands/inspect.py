"""``qlora inspect``: what the recipe adapts in a model, read from its config."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_plugin.commands.inspect_gguf import show
from qlora_plugin.commands.options import add_recipe_options, recipe_from_args, subcommand
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.tools.console import console, count, gib, print_json, table
from qlora_plugin.tools.gguf_read import is_gguf
from qlora_plugin.tools.inspection import analyze, base_sizes, describe_recipe, group_skipped
from qlora_plugin.tools.model_source import model_source
from qlora_plugin.tools.run_inspection import inspect_run, is_run


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(
        commands,
        "inspect",
        "show what the recipe adapts in a model, its trainable parameters and 4-bit size",
        "qlora inspect ./Llama-3.2-1B --preset paper --set r=32",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a model directory (only config.json is read), an Axolotl YAML (its base_model) or a hub id; a run's "
        "output directory or checkpoint, to show what it trained (its qlora_recipe.json); or a .gguf file, to read "
        "it back",
    )
    add_recipe_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    """``qlora inspect``."""
    if is_gguf(args.model):
        return show(args.model, args.json)

    if is_run(args.model):
        return show_run(args)
    source = model_source(args.model)
    report = analyze(source.model, recipe_from_args(args, source.section))
    sizes = base_sizes(report)
    skipped = group_skipped(report)
    if args.json:
        print_json(report.to_dict() | {"base_bytes": sizes, "skipped_groups": skipped})
        return 0
    out = console()
    dims = report.config.get_text_config() if hasattr(report.config, "get_text_config") else report.config
    out.print(
        f"[bold]{report.source}[/bold]  {report.architecture} ({report.model_type}), "
        f"{getattr(dims, 'num_hidden_layers', '?')} layers, hidden {getattr(dims, 'hidden_size', '?')}, "
        f"vocabulary {getattr(dims, 'vocab_size', '?')}"
    )
    out.print(f"recipe  {describe_recipe(report.recipe)}")
    out.print()
    rows = [
        [
            g["module"],
            g["layer_ranges"],
            g["count"],
            f"{g['in_features']} -> {g['out_features']}",
            f"{g['lora_params_each']:,}",
            f"{g['lora_params']:,}",
        ]
        for g in report.groups
    ]
    out.print(
        table(
            f"Adapted modules ({len(report.targets)})",
            ["module", "layers", "count", "in -> out", "LoRA params each", "LoRA params"],
            rows,
            {2, 4, 5},
        )
    )
    if report.experts:
        experts = report.expert_summary()
        out.print(
            f"\nmixture-of-experts: {experts['modules']} expert modules x {experts['experts_per_module']} experts, "
            f"{experts['parameters']} fused expert parameters ({count(experts['weights'])} weights; "
            f"{', '.join(experts['names'])}): [bold]{experts['quantized_4bit']} in 4 bits[/bold], "
            f"[bold]{experts['with_adapters']} with LoRA[/bold] ({experts['lora_params']:,} LoRA parameters)"
        )
    share = 100 * report.trainable_params / max(report.base_params, 1)
    out.print(
        f"\ntrainable LoRA parameters: [bold]{report.trainable_params:,}[/bold] "
        f"({count(report.trainable_params)}, {share:.2f}% of the {count(report.base_params)} base)"
    )
    out.print(
        f"base in 4 bits: [bold]{gib(sizes['total'])} GiB[/bold] = {gib(sizes['linear_4bit'])} GiB 4-bit linear "
        f"{'and expert ' if report.experts else ''}weights with their constants + {gib(sizes['unquantized'])} GiB "
        "kept in the compute dtype "
        f"(embeddings, {'tied ' if report.tied_head else ''}output head, norms); "
        f"{gib(sizes['all_16bit'])} GiB in bf16"
    )
    out.print()
    if skipped:
        rows = [[s["module"], s["layer_ranges"], s["count"], s["reason"]] for s in skipped]
        out.print(table("Linear layers without adapters", ["module", "layers", "count", "why"], rows, {2}))
    else:
        out.print("every linear layer gets an adapter")
    for warning in report.warnings():
        out.print(f"[yellow]warning:[/yellow] {warning}")
    return 0


def show_run(args: argparse.Namespace) -> int:
    """``qlora inspect RUN``: the record of what a run trained."""
    if args.overrides or args.preset is not None:
        raise QLoRAConfigError(
            "--set/--preset",
            args.overrides or args.preset,
            f"{args.model} is a run: its record says what it trained, and no recipe changes that",
            "drop --set/--preset, or inspect the base model directory with them",
        )
    run = inspect_run(args.model)
    if args.json:
        print_json(run.to_dict())
        return 0
    for line in run.lines():
        print(line)
    return 0
