"""batchllm: batch LLM inference. `LLM` and `SamplingParams` are the engine's public API.

Importing this package is cheap: torch and the engine load on first use of `LLM`.
"""
import os as _os

__version__ = "0.1.0"

# In a source checkout kernels/ sits beside batchllm/ and is installed as batchllm.kernels
# (pyproject package-dir). Let `batchllm.kernels` resolve there too when run from the tree.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "reference.py")
):
    __path__.append(_root)  # noqa: F821  (package __path__)


def __getattr__(name):
    if name == "LLM":
        from batchllm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from batchllm.engine.sampling import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from batchllm.engine.request import RequestOutput

        return RequestOutput
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]
