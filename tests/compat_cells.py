"""The compatibility matrix: each way a user meets the fast path, run for real against TRL's own 4-bit path.

A cell trains twice from the same seed, data and initial adapter: once as the user
would with the plugin (``peft_config=qlora_recipe(...)``, or the Axolotl plugin) and
once as TRL's own 4-bit path (a ``BitsAndBytesConfig`` NF4 + double-quant model and a
plain ``peft.LoraConfig`` on all linear layers, same trainer arguments). It reports:

- ``status``: ``fast`` (the fast path went on), ``fallback`` (it stayed off or left a
  part to the trainer, with the plugin's one log line saying why) or ``crash``;
- ``max_loss_dev_pct``: the largest relative difference of a logged training loss (and
  of the eval loss where the cell evaluates) from the baseline's, in percent;
- ``tok_s``: tokens the model received in training forwards per second of training.

Shared by the CPU tests (``test_compat_matrix.py``, tiny models, the fast path's
reference kernels through ``QLORA_FAST_PATH_ON_CPU=1``) and the GPU suite
(``benchmarks/compat_matrix.py``, real shapes, bf16).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tiny import SENTENCES

SHORT = ["the cat sat", "rain falls", "a green frog jumps", "she plays the violin"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} </s>"
    "{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)


@dataclass
class Cell:
    """One way of using the plugin; ``args`` are the trainer arguments both runs share."""

    name: str
    trainer: str = "sft"  # sft | dpo | grpo | trainer (transformers' Trainer) | axolotl
    args: dict[str, Any] = field(default_factory=dict)
    recipe_args: bool = False  # the plugin run uses recipe.sft_config(**args) / recipe.training_args()
    recipe: dict[str, Any] = field(default_factory=dict)  # qlora_recipe overrides
    model: str = "name"  # name | 4bit | bf16 (how the plugin run is given the model)
    family: str = "llama"
    data: str = "lm"  # lm | padded | prompt_completion | conversational | preference | prompt_only
    compare: bool = True  # losses must match the baseline
    resume: bool = False  # save mid-run; a fresh trainer resumes from there and must log the same losses
    expect: str = "fast"  # the status the cell must reach
    axolotl: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    cell: str
    status: str
    reason: str = ""
    max_loss_dev_pct: float | None = None
    tok_s: float | None = None
    baseline_tok_s: float | None = None
    noise_floor_pct: float | None = None  # the baseline against itself from a start nudged below bf16's rounding step
    fp32_adapters_dev_pct: float | None = None  # against TRL's path with its adapters kept in float32
    fp32_adapters_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    baseline_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Setting:
    """Where the matrix runs: tiny models on a CPU, or real shapes on a GPU."""

    workdir: Path
    device: str = "cpu"
    steps: int = 30
    batch: int = 8
    length: int = 32
    compute_dtype: str = "float32"
    learning_rate: float = 2e-3
    model_factory: Callable[[str, Path], Path] | None = None  # family -> saved model directory
    noise_floor: bool = False  # also run the baseline from a nudged start and report how far the two drift apart
    # Also compare with TRL's path whose adapters stay float32: TRL rounds a quantized model's
    # trainable weights to bf16 when it builds the trainer, the plugin keeps float32 masters.
    fp32_adapter_baseline: bool = False
    rows: int = 64


# -- data ------------------------------------------------------------------------


def dataset(kind: str, rows: int, length_words: int | None = None) -> Any:
    """A small real ``datasets.Dataset`` of the kind a cell trains on."""
    from datasets import Dataset

    def sentence(i: int) -> str:
        words = SENTENCES[i % len(SENTENCES)].split()
        if length_words:
            words = (words * (length_words // len(words) + 1))[:length_words]
        return " ".join(words)

    if kind == "lm":
        return Dataset.from_dict({"text": [sentence(i) for i in range(rows)]})
    if kind == "padded":
        return Dataset.from_dict({"text": [sentence(i) if i % 2 else SHORT[i % len(SHORT)] for i in range(rows)]})
    if kind == "prompt_completion":
        return Dataset.from_dict(
            {
                "prompt": [" ".join(sentence(i).split()[:4]) for i in range(rows)],
                "completion": [" " + " ".join(sentence(i).split()[4:]) for i in range(rows)],
            }
        )
    if kind == "conversational":
        return Dataset.from_dict(
            {
                "messages": [
                    [
                        {"role": "user", "content": " ".join(sentence(i).split()[:4])},
                        {"role": "assistant", "content": " ".join(sentence(i).split()[4:])},
                    ]
                    for i in range(rows)
                ]
            }
        )
    if kind == "preference":
        return Dataset.from_dict(
            {
                "prompt": [" ".join(sentence(i).split()[:4]) for i in range(rows)],
                "chosen": [" " + " ".join(sentence(i).split()[4:]) for i in range(rows)],
                "rejected": [" " + " ".join(sentence(i + 3).split()[4:]) for i in range(rows)],
            }
        )
    if kind == "prompt_only":
        return Dataset.from_dict({"prompt": [" ".join(sentence(i).split()[:3]) for i in range(rows)]})
    raise ValueError(kind)


def word_count_reward(completions: list[str], **_: Any) -> list[float]:
    """GRPO's tiny reward: longer completions score higher (capped)."""
    return [min(len(str(c).split()), 8) / 8.0 for c in completions]


# -- running ---------------------------------------------------------------------


class _TokenCounter:
    """Counts the tokens the model really receives in training forwards (a forward pre-hook)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.handle: Any = None

    def attach(self, model: torch.nn.Module) -> None:
        def count(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if module.training and isinstance(ids, torch.Tensor):
                self.tokens += ids.numel()

        self.handle = model.register_forward_pre_hook(count, with_kwargs=True)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured(logger: str = "qlora_plugin") -> Iterator[_Messages]:
    handler = _Messages()
    log = logging.getLogger(logger)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _bnb_config(setting: Setting) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, setting.compute_dtype),
    )


def _base_args(cell: Cell, setting: Setting, out: Path) -> dict[str, Any]:
    on_gpu = setting.device == "cuda"
    args: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=setting.steps,
        per_device_train_batch_size=setting.batch,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        # the shuffle's own seed: without it accelerate's sampler takes torch's last manual seed when the
        # dataloader is built, so both runs of a cell could see another order after the first epoch
        data_seed=0,
        learning_rate=setting.learning_rate,
        lr_scheduler_type="constant",
        bf16=on_gpu and setting.compute_dtype == "bfloat16",
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if cell.trainer in ("sft", "dpo"):
        args["max_length"] = setting.length
    if cell.trainer == "grpo":
        args.update(
            num_generations=4,
            max_completion_length=8,
            per_device_train_batch_size=4,
            generation_batch_size=8,
            temperature=1.0,
            logging_steps=1,
        )
    args.update(cell.args)
    return args


def _trl_config(cell: Cell, args: dict[str, Any]) -> Any:
    import trl

    config_class = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[cell.trainer]
    return config_class(**args)


def _model_for(cell: Cell, setting: Setting, path: Path, plugin: bool, recipe: Any) -> Any:
    """What the run passes as ``model=``: the path, or a model loaded the way the cell says."""
    from transformers import AutoModelForCausalLM

    if not plugin or cell.model == "name":
        return str(path)
    device_map = {"": setting.device if setting.device == "cpu" else 0}
    if cell.model == "4bit":
        return recipe.load_model(path, device_map=device_map)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, setting.compute_dtype), device_map=device_map
    )


def _train(
    cell: Cell,
    setting: Setting,
    path: Path,
    plugin: bool,
    out: Path,
    resume_from: int | None = None,
    adapters: dict[str, torch.Tensor] | None = None,
    adapter_dtype: torch.dtype | None = None,
) -> tuple[Any, _TokenCounter, float]:
    """One run of ``cell``: the plugin's (``plugin``) or TRL's own 4-bit path.

    The plugin run keeps its adapters as they were before the first step on the returned
    trainer (``initial_adapters``); a baseline given them as ``adapters`` starts from them
    (the plugin seeds each layer's initialisation its own way, TRL's path draws from the
    global generator).

    ``resume_from``: after training, a fresh trainer resumes from that step's checkpoint;
    the losses it logs (the checkpoint's history, then its own) are kept on the returned
    trainer as ``resumed_losses``. ``adapter_dtype``: the baseline's trainable weights are
    cast to it once the trainer is built (TRL 1.9 rounds them to bf16 for a quantized model).
    """
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(
        **{
            "compute_dtype": setting.compute_dtype,
            "lora_dropout": 0.0,
            "learning_rate": setting.learning_rate,
            "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0,
            **cell.recipe,
        }
    )
    plain = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=cell.recipe.get("target_modules", "all-linear"),
        task_type="CAUSAL_LM",
    )
    args = _base_args(cell, setting, out)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if cell.data == "conversational":
        tokenizer.chat_template = CHAT_TEMPLATE
    if cell.trainer in ("dpo", "grpo"):
        tokenizer.padding_side = "left" if cell.trainer == "grpo" else tokenizer.padding_side
    train_data = dataset(cell.data, setting.rows)
    eval_data = dataset(cell.data, 16) if args.get("eval_strategy") not in (None, "no") else None
    counter = _TokenCounter()
    if cell.trainer == "trainer":  # PEFT keeps the adapters in float32 there already
        return _train_plain_trainer(
            recipe, plain, plugin, path, args, tokenizer, train_data, counter, setting, adapters
        )
    if cell.recipe_args and cell.trainer == "sft":
        config = recipe.sft_config(**args)  # both runs: the same SFTConfig, made by the recipe
    else:
        if not plugin:  # TRL's own 4-bit path loads the model with a BitsAndBytesConfig
            args["model_init_kwargs"] = {
                "quantization_config": _bnb_config(setting),
                "dtype": getattr(torch, setting.compute_dtype),
            }
        config = _trl_config(cell, args)
    kwargs: dict[str, Any] = dict(
        args=config, train_dataset=train_data, processing_class=tokenizer, peft_config=recipe if plugin else plain
    )
    if eval_data is not None:
        kwargs["eval_dataset"] = eval_data
    if cell.trainer == "grpo":
        kwargs["reward_funcs"] = word_count_reward
    if cell.args.get("prediction_loss_only") is False:
        kwargs["compute_metrics"] = _token_accuracy
    torch.manual_seed(0)
    trainer = _trainer_class(cell.trainer)(model=_model_for(cell, setting, path, plugin, recipe), **kwargs)
    if not plugin:
        _no_cpu_repacking(trainer.model)
        if adapter_dtype is not None:
            _cast_trainable(trainer.model, adapter_dtype)
    _same_start(trainer.model, plugin, adapters)
    trainer.initial_adapters = _adapters(trainer.model)
    counter.attach(trainer.model)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if eval_data is not None:
        trainer.evaluate()
    if resume_from is not None:  # a fresh trainer picks the run up from its middle checkpoint
        torch.manual_seed(0)
        resumed = _trainer_class(cell.trainer)(model=_model_for(cell, setting, path, plugin, recipe), **kwargs)
        resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{resume_from}"))
        trainer.resumed_losses = _losses(resumed)[0]
    return trainer, counter, seconds


def _no_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep the baseline's 4-bit layers out of bitsandbytes' CPU repacking too.

    On CPUs with AVX512-BF16, an eval pass makes bitsandbytes repack its layers, which
    then train without input gradients (``test_cpu_layout.py`` shows it): a baseline that
    evaluates would drift for reasons that have nothing to do with the plugin.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _token_accuracy(prediction: Any) -> dict[str, float]:
    import numpy as np

    logits, labels = prediction
    predicted = np.argmax(logits[:, :-1], axis=-1)
    target = labels[:, 1:]
    mask = target != -100
    return {"token_accuracy": float((predicted[mask] == target[mask]).mean())}


def _trainer_class(kind: str) -> Any:
    import trl

    return {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer, "grpo": trl.GRPOTrainer}[kind]


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def _cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def _same_start(model: torch.nn.Module, plugin: bool, adapters: dict[str, torch.Tensor] | None) -> None:
    """Give the baseline's LoRA weights the plugin run's initial values (same names on both)."""
    if plugin or adapters is None:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapters:
                p.copy_(adapters[name].to(p.device, p.dtype))


def _train_plain_trainer(
    recipe: Any,
    plain: Any,
    plugin: bool,
    path: Path,
    args: dict[str, Any],
    tokenizer: Any,
    data: Any,
    counter: _TokenCounter,
    setting: Setting,
    adapters: dict[str, torch.Tensor] | None,
) -> tuple[Any, _TokenCounter, float]:
    """transformers' ``Trainer`` over a PEFT model, with ``recipe.training_args()`` for the plugin run."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    for key in ("max_length",):
        args.pop(key, None)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenized = data.map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=setting.length), remove_columns=data.column_names
    )
    device_map = {"": setting.device if setting.device == "cpu" else 0}
    training = {**recipe.training_args(), **args}  # both runs: the same arguments, as the recipe makes them
    if plugin:
        model = recipe.load_model(path, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=_bnb_config(setting),
            dtype=getattr(torch, setting.compute_dtype),
            device_map=device_map,
        )
    torch.manual_seed(0)
    model = get_peft_model(model, recipe if plugin else plain)
    _same_start(model, plugin, adapters)
    initial = _adapters(model)
    if not plugin:
        _no_cpu_repacking(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training),
        train_dataset=tokenized,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.initial_adapters = initial
    counter.attach(trainer.model)
    start = time.perf_counter()
    trainer.train()
    return trainer, counter, time.perf_counter() - start


def _train_axolotl(
    cell: Cell, setting: Setting, path: Path, plugin: bool, out: Path, fp32_adapters: bool = False
) -> tuple[list[float], str]:
    """``axolotl train`` with the plugin, or (baseline) the plugin-free config the plugin run wrote.

    ``fp32_adapters``: the baseline lets PEFT keep the adapters in float32 (as the plugin's
    fast path does). Returns the logged training losses and the run's output (for the fast
    path's log line).
    """
    import json
    import re
    import subprocess
    import sys

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    if plugin:
        rows = dataset(cell.data, setting.rows)
        data_file = out.parent / "data.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        config: dict[str, Any] = {
            "base_model": str(path),
            "plugins": ["qlora_plugin.axolotl.QLoRAPlugin"],
            "qlora": {
                "lora_dropout": 0.0,
                "learning_rate": setting.learning_rate,
                "lr_scheduler_type": "constant",
                "warmup_ratio": 0.0,
                "compute_dtype": setting.compute_dtype,
                **cell.recipe,
            },
            "datasets": [
                {
                    "path": str(data_file),
                    "type": "chatml.prompt_pairs" if cell.data == "preference" else "completion",
                    "split": "train",
                }
            ],
            "sequence_len": setting.length,
            "micro_batch_size": setting.batch,
            "gradient_accumulation_steps": 1,
            "max_steps": setting.steps,
            "logging_steps": 1,
            "save_strategy": "no",
            "val_set_size": 0,
            "seed": 0,
            "output_dir": str(out),
            "dataset_prepared_path": str(out / "prepared"),
            "attn_implementation": "sdpa",
            **cell.axolotl,
        }
    else:
        config = yaml.safe_load((out.parent / "plugin" / "qlora_expanded.yml").read_text())
        config.update(output_dir=str(out), dataset_prepared_path=str(out / "prepared"))
        if fp32_adapters:
            config["peft_autocast_adapter_dtype"] = True
    # both runs start from the plugin run's adapter (tests/compat_axolotl_start.py)
    config["plugins"] = [*config.get("plugins", []), "compat_axolotl_start.SameStartingAdapter"]
    start = out.parent / "starting_adapter.pt"
    config_file = out / "config.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    here = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "QLORA_COMPAT_ADAPTER_SAVE" if plugin else "QLORA_COMPAT_ADAPTER_LOAD": str(start),
    }
    run = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "train", str(config_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    output = run.stdout + run.stderr
    (out / "log.txt").write_text(output)
    if run.returncode != 0:
        raised = [
            line.strip()
            for line in output.splitlines()
            if re.match(r"\s*[\w.]*(Error|Exception): ", line) and "CalledProcessError" not in line
        ]  # the training process's own exception, above accelerate's launcher traceback
        first = f"{raised[-1]}; " if raised else ""
        raise RuntimeError(f"axolotl train exited {run.returncode}: {first}" + "\n".join(output.splitlines()[-12:]))
    losses = [float(m) for m in re.findall(r"'loss': '?([0-9.]+(?:e-?[0-9]+)?)'?", output)]
    return losses, output


def _losses(trainer: Any) -> tuple[list[float], float | None]:
    history = trainer.state.log_history
    train = [float(entry["loss"]) for entry in history if "loss" in entry]
    evals = [float(entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    return train, (evals[-1] if evals else None)


def _deviation(ours: list[float], theirs: list[float]) -> float:
    if not ours or len(ours) != len(theirs):
        return math.inf
    return max(abs(a - b) / max(abs(b), 1e-8) * 100 for a, b in zip(ours, theirs, strict=False))


def _run_deviation(ours: tuple[list[float], float | None], theirs: tuple[list[float], float | None]) -> float:
    """:func:`_deviation` of two runs' logged losses, and of their eval losses where both evaluated."""
    deviation = _deviation(ours[0], theirs[0])
    if ours[1] is not None and theirs[1] is not None:
        deviation = max(deviation, abs(ours[1] - theirs[1]) / abs(theirs[1]) * 100)
    return deviation


def _status(lines: list[str]) -> tuple[str, str]:
    on = [line for line in lines if line.startswith("qlora fast path on:")]
    if on:  # the reason names what the fast path left to the trainer, if anything
        left = [part.strip() for part in on[-1].split(";") if "left to" in part]
        return "fast", "; ".join(left)
    off = [line for line in lines if "left alone" in line or "fast path off" in line]
    return "fallback", off[0] if off else "the fast path never went on"


def run_cell(cell: Cell, setting: Setting) -> Result:
    """Train ``cell`` with the plugin and with TRL's own path; compare."""
    from qlora_plugin.fastpath import activation as speed

    path = setting.model_factory(cell.family, setting.workdir) if setting.model_factory else None
    assert path is not None, "Setting.model_factory is required"
    work = setting.workdir / cell.name
    if cell.trainer == "axolotl":
        return _run_axolotl_cell(cell, setting, path, work)
    speed.disarm()
    try:
        with _captured() as messages:
            trainer, counter, seconds = _train(
                cell,
                setting,
                path,
                plugin=True,
                out=work / "plugin",
                resume_from=setting.steps // 2 if cell.resume else None,
            )
        losses, eval_loss = _losses(trainer)
        resumed_losses = getattr(trainer, "resumed_losses", None)
        initial = trainer.initial_adapters
        tok_s = counter.tokens / seconds if seconds else None
        status, reason = _status(messages.lines)
    except Exception as error:  # noqa: BLE001 - a crash is a result of the matrix
        return Result(
            cell.name, "crash", f"{type(error).__name__}: {error}"[:500] + "\n" + traceback.format_exc()[-1500:]
        )
    finally:
        speed.disarm()
    del trainer
    result = Result(cell.name, status, reason, tok_s=tok_s, losses=losses)
    if resumed_losses is not None and _deviation(resumed_losses, losses) > 1.0:
        result.status, result.reason = "crash", f"resumed losses {resumed_losses} differ from {losses}"
        return result
    if not cell.compare:
        result.max_loss_dev_pct = None if all(math.isfinite(x) for x in losses) else math.inf
        return result
    base, base_counter, base_seconds = _train(
        cell, setting, path, plugin=False, out=work / "baseline", adapters=initial
    )
    base_losses, base_eval = _losses(base)
    result.baseline_losses = base_losses
    result.baseline_tok_s = base_counter.tokens / base_seconds if base_seconds else None
    result.max_loss_dev_pct = round(_run_deviation((losses, eval_loss), (base_losses, base_eval)), 4)
    if setting.noise_floor:
        again, _, _ = _train(cell, setting, path, plugin=False, out=work / "baseline-nudged", adapters=nudged(initial))
        result.noise_floor_pct = round(_deviation(_losses(again)[0], base_losses), 4)
    if setting.fp32_adapter_baseline and cell.trainer != "trainer":
        kept, _, _ = _train(
            cell,
            setting,
            path,
            plugin=False,
            out=work / "baseline-fp32-adapters",
            adapters=initial,
            adapter_dtype=torch.float32,
        )
        kept_losses, kept_eval = _losses(kept)
        result.fp32_adapters_losses = kept_losses
        result.fp32_adapters_dev_pct = round(_run_deviation((losses, eval_loss), (kept_losses, kept_eval)), 4)
    return result


NUDGE = 2.0**-10  # relative; a bf16 rounding step is 2**-8 to 2**-7 of a value


def nudged(adapters: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """``adapters`` each moved by a relative ``NUDGE`` up or down at random.

    The change is a fraction of one bf16 rounding step: only the values near a rounding
    boundary round differently, the size of difference that another summation order makes.
    How far TRL's path drifts from itself after such a start is the floor any other
    implementation in bf16 can be held to.
    """
    generator = torch.Generator().manual_seed(seed)
    moved = {}
    for name in sorted(adapters):
        tensor = adapters[name]
        sign = torch.randint(0, 2, tensor.shape, generator=generator).to(tensor.dtype) * 2 - 1
        moved[name] = tensor * (1 + NUDGE * sign.to(tensor.device))
    return moved


def _run_axolotl_cell(cell: Cell, setting: Setting, path: Path, work: Path) -> Result:
    try:
        losses, output = _train_axolotl(cell, setting, path, plugin=True, out=work / "plugin")
    except Exception as error:  # noqa: BLE001 - a crash is a result of the matrix
        return Result(cell.name, "crash", f"{type(error).__name__}: {error}"[:2000])
    marker = "qlora fast path on:"  # Axolotl's log lines carry a prefix before the plugin's message
    status, reason = _status(
        [marker + line.split(marker, 1)[1] if marker in line else line for line in output.splitlines()]
    )
    result = Result(cell.name, status, reason, losses=losses)
    if cell.compare:
        result.baseline_losses, _ = _train_axolotl(cell, setting, path, plugin=False, out=work / "baseline")
        result.max_loss_dev_pct = round(_deviation(losses, result.baseline_losses), 4)
        if setting.fp32_adapter_baseline:
            result.fp32_adapters_losses, _ = _train_axolotl(
                cell, setting, path, plugin=False, out=work / "baseline-fp32-adapters", fp32_adapters=True
            )
            result.fp32_adapters_dev_pct = round(_deviation(losses, result.fp32_adapters_losses), 4)
    return result


def fast_path_on_cpu() -> contextlib.AbstractContextManager[None]:
    """The environment the CPU cells run the fast path in."""
    from qlora_plugin.core.environment import FAST_PATH_ON_CPU as CPU_ENV

    @contextlib.contextmanager
    def switched() -> Iterator[None]:
        old = os.environ.get(CPU_ENV)
        os.environ[CPU_ENV] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(CPU_ENV, None)
            else:
                os.environ[CPU_ENV] = old

    return switched()
