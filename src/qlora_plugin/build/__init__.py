"""From a recipe to a trainable model: loading, 4-bit layers (dense and MoE experts), LoRA layers, preparation, the run.

Above :mod:`qlora_plugin.core` (the recipe as data), below the fast path and the trainer integrations.
What a run decides lives in one object, the run context (:mod:`qlora_plugin.build.context`).
"""
