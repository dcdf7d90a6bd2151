"""jitnet.io: checkpoints (safetensors), rotating savers, TensorBoard summaries and plain logs.

Everything here works on plain NumPy arrays and accepts any array-like (converted with
``np.asarray``); loaders return NumPy arrays.
"""
from .checkpoint import (Saver, StateKeyError, check_state, flatten_state, latest_checkpoint,
                         load, save, unflatten_state)
from .safetensors import load_file, load_metadata, save_file, validate_file
from .summary import (CSVLogger, JSONLLogger, SummaryWriter, crc32c, encode_png,
                      masked_crc32c)

__all__ = [
    "save", "load", "check_state", "StateKeyError", "flatten_state", "unflatten_state",
    "Saver", "latest_checkpoint",
    "save_file", "load_file", "load_metadata", "validate_file",
    "SummaryWriter", "CSVLogger", "JSONLLogger", "crc32c", "masked_crc32c", "encode_png",
]
