"""The ``qlora`` command: a thin dispatcher over one module per subcommand.

Only argparse runs at start-up; torch, transformers and bitsandbytes are
imported by the subcommand that needs them (``presets``, ``check``,
``convert-finlora`` and ``inspect``/``estimate`` on a common decoder's config
never import them). Third-party warnings stay out of the output unless
``--verbose``. Bad input exits 2 and a failed run 1, each with one line on
stderr; SIGINT, SIGTERM and SIGHUP end a run with one line too, after its
temporary files are removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from qlora_plugin.command_options import add_recipe_options as _recipe_options
from qlora_plugin.errors import QLoRAConfigError

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def _command(commands: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show the warnings of torch, transformers, bitsandbytes and other libraries")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qlora``."""
    from qlora_plugin import __version__

    parser = argparse.ArgumentParser(prog="qlora", description="QLoRA recipes for TRL and Axolotl.")
    parser.add_argument("--version", action="version", version=f"qlora-plugin {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the warnings of torch, transformers, bitsandbytes and other libraries")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    presets = _command(commands, "presets", "list the named presets of every installed plugin",
                       "qlora presets --json")
    presets.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect = _command(
        commands, "inspect", "show what the recipe adapts in a model, its trainable parameters and 4-bit size",
        "qlora inspect ./Llama-3.2-1B --preset paper --set r=32",
    )
    inspect.add_argument("model", help="a local model directory (only config.json is read) or a hub id")
    _recipe_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")

    estimate = _command(
        commands, "estimate", "predict the peak GPU memory of a QLoRA training step and the GPUs it fits",
        "qlora estimate ./Llama-3.1-8B --seq 2048 --batch 4 --gpu h100-80gb --recompute offload",
    )
    estimate.add_argument("model", help="a local model directory (only config.json is read) or a hub id")
    estimate.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    estimate.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    estimate.add_argument("--gpu", action="append", default=None, metavar="NAME",
                          help="only this GPU in the fit table (repeatable); names: see the table")
    _recipe_options(estimate)
    path = estimate.add_argument_group("training path (defaults follow the recipe: fast_path, gradient_checkpointing)")
    path.add_argument("--path", choices=["stock", "fast"], default=None,
                      help="stock: PEFT's fp32 upcasts; fast: the base in the compute dtype")
    path.add_argument("--recompute", choices=["none", "full", "offload"], default=None,
                      help="decoder-layer recompute in backward; offload parks layer inputs in host memory")
    path.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=None,
                      help="fast path: chunked loss without full logits (default on)")
    path.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                      help="fast path: fused LoRA over NF4, fused RMSNorm/SwiGLU, fully paged AdamW (default on)")
    path.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], default=None,
                      help="fast path: dtype of the LoRA weights (default float32 masters)")
    path.add_argument("--cached-constants", action="store_true", default=None,
                      help="fast path: the 4-bit block constants kept decoded in float32")
    estimate.add_argument("--json", action="store_true", help="print JSON instead of tables")

    check = _command(
        commands, "check", "check an Axolotl config before training: the plugin line, the qlora section, the data",
        "qlora check configs/qlora.yml",
    )
    check.add_argument("config", metavar="CONFIG", help="an Axolotl YAML with a qlora: section")
    check.add_argument("--json", action="store_true", help="print the findings as JSON")

    merge = _command(
        commands, "merge", "merge a QLoRA adapter into its dequantized base and save a plain model",
        "qlora merge ./out/checkpoint-500 --out ./merged --dtype bf16",
    )
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="a directory with adapter_config.json")
    merge.add_argument("--out", required=True, help="the directory to write (must be new or empty)")
    merge.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="saved dtype (default bf16)")
    merge.add_argument("--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--force", action="store_true", help="replace a non-empty --out")
    trained = merge.add_argument_group(
        "the 4-bit base the adapter was trained against (read from qlora_recipe.json, qlora_expanded.yml or the run's "
        "config.json; needed only where none of them says)")
    trained.add_argument("--quant-type", choices=["nf4", "fp4"], default=None, help="the 4-bit data type of training")
    trained.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                         help="whether training quantized the block constants too")
    trained.add_argument("--assume-default-recipe", action="store_true",
                         help="no record says: take the recipe's defaults (NF4 with double quant)")
    merge.add_argument("--json", action="store_true", help="print a JSON summary at the end")

    finlora = _command(
        commands, "convert-finlora", "turn a FinLoRA finetune_configs.json entry into an Axolotl YAML",
        "qlora convert-finlora lora/finetune_configs.json sentiment_llama_3_1_8b_4bits_r4 "
        "--out configs/sentiment.yml",
    )
    finlora.add_argument("configs", metavar="CONFIGS_JSON", help="FinLoRA's finetune_configs.json (or one like it)")
    finlora.add_argument("name", metavar="NAME", help="the entry to convert")
    finlora.add_argument("--out", default=None, help="the YAML to write (default configs/NAME.yml)")
    finlora.add_argument("--preset", default=None, help="add `preset: NAME` to the qlora section")
    finlora.add_argument("--base-model", default=None, help="use this model instead of the entry's (e.g. a local copy)")
    finlora.add_argument("--force-4bit", action="store_true",
                         help="convert an 8- or 16-bit entry as a 4-bit QLoRA run instead of refusing it")
    finlora.add_argument("--dataset-type", default="finlora",
                         help="Axolotl dataset type; 'finlora' maps its context/target fields (default)")
    finlora.add_argument("--sequence-len", type=int, default=4096, help="Axolotl sequence_len (default 4096)")
    finlora.add_argument("--force", action="store_true", help="overwrite an existing --out")
    finlora.add_argument("--json", action="store_true", help="print the config as JSON too")
    return parser


def show_presets(as_json: bool) -> None:
    """Print every preset with the fields it sets."""
    from qlora_plugin.console import print_json
    from qlora_plugin.presets import all_presets

    presets = all_presets()
    if as_json:
        print_json(dict(sorted(presets.items())))
        return
    for name, fields in sorted(presets.items()):
        settings = ", ".join(f"{key}={value}" for key, value in fields.items()) or "(the recipe defaults)"
        print(f"{name:<14} {settings}")


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand."""
    if args.command == "presets":
        show_presets(args.json)
        return 0
    if args.command == "inspect":
        from qlora_plugin.inspection import command
    elif args.command == "estimate":
        from qlora_plugin.estimate import command
    elif args.command == "check":
        from qlora_plugin.preflight import command
    elif args.command == "merge":
        from qlora_plugin.merge import command
    else:
        from qlora_plugin.finlora import command
    return command(args)


def main(argv: list[str] | None = None) -> int:
    """Run ``qlora``; returns the exit status (2 for bad input, with the fix on stderr; 1 if the work failed)."""
    from qlora_plugin.console import quiet_third_party
    from qlora_plugin.safe_io import Interrupted, is_disk_full, stop_signals_raise

    args = build_parser().parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    name = f"qlora {args.command}"
    try:
        with stop_signals_raise():
            return run(args)
    except (QLoRAConfigError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Interrupted) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"{name}: stopped by {signal.Signals(signum).name}; nothing was written (temporary files removed)",
              file=sys.stderr)
        return 128 + signum
    except Exception as error:
        if os.environ.get("QLORA_TRACEBACK"):
            raise
        if is_disk_full(error):
            print(f"{name}: failed: the disk is full, or a file-size limit was reached ({_one_line(error)}); "
                  "nothing was written. Fix: free space where the output goes, or write it elsewhere", file=sys.stderr)
        else:
            print(f"{name}: failed: {type(error).__name__}: {_one_line(error)} "
                  "(nothing was written; set QLORA_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
