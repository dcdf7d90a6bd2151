"""jitnet.interop: weights in and out of other frameworks.

``jitnet.interop.torch`` maps PyTorch state dicts (torch tensors, NumPy arrays or safetensors files saved by
``safetensors.torch``) onto jitnet models and back. PyTorch itself is optional: it is imported only when a
torch module or tensor is given or torch tensors are asked for (``pip install "jitnet[interop]"``).
"""
from .torch import (TorchMapping, load_torch_state_dict, match_torch_state_dict, save_torch_safetensors,
                    torch_state_dict)

__all__ = ["TorchMapping", "load_torch_state_dict", "match_torch_state_dict", "save_torch_safetensors",
           "torch_state_dict"]
