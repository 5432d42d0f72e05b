"""The fast path: kernels for QLoRA training and the moment they go on a model (imports ``core`` only)."""
