"""What ``skipgpt export`` writes: a folder that is both a skipgpt folder and a Hugging Face model
folder whose remote code (``auto_map``) loads it routed in plain transformers."""

from .card import DENSE_WARNING, model_card
from .remote_code import (
    ENTRY_MODULE,
    WEIGHTS_NAME,
    code_closure,
    stock_state_dict,
    write_hf_folder,
    write_remote_code,
)

__all__ = [
    "DENSE_WARNING",
    "ENTRY_MODULE",
    "WEIGHTS_NAME",
    "code_closure",
    "model_card",
    "stock_state_dict",
    "write_hf_folder",
    "write_remote_code",
]
