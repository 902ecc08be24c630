"""Training on top of quantized models: QLoRA (LoRA adapters on a frozen 4-bit base)."""
