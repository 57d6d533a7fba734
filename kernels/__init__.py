"""Triton kernels for batchllm, installed as `batchllm.kernels`; pure-torch references in reference.py.

Import the Triton modules (attention, cache) only where Triton is installed; reference.py needs torch alone.
"""
