"""Weight-only quantization: the packed weight format (tensor.py), quantizing float weights into it
(quantize.py) and converting GGUF's block formats into it (ggml.py)."""
