"""The device runtime (``tqedge.runtime``): load a bundle, run it, generate text.

Imports only the base install (numpy, numba, onnxruntime, tokenizers, jinja2, click).
"""
