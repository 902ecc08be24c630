"""GGUF, llama.cpp's file format: its block formats, writing lowbit models as GGUF files, and
checking those files with llama.cpp itself."""
