"""Bridges to other libraries (transformers quantizer hooks)."""
