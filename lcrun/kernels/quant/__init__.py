"""Quantized weights (GGUF block formats) kept quantized on the device: formats, containers, kernels."""
