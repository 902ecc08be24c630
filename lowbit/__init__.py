"""lowbit: quantize Hugging Face language models and measure what it cost."""
