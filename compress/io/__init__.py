"""Checkpoint I/O: lazy readers (``reader``), streaming atomic writers (``writer``: ``write_folder`` writes every
model), the model loader (``models``), PEFT LoRA adapters (``lora``) and the llama2.c converter (``llama2c``)."""

from compress.io.reader import Checkpoint, TensorInfo, is_peft_adapter, open_checkpoint
from compress.io.models import load_model
from compress.io.writer import ShardedWriter, atomic_dir, atomic_file, copy_aux, write_folder, write_model_card

__all__ = ["Checkpoint", "TensorInfo", "is_peft_adapter", "open_checkpoint", "ShardedWriter", "atomic_dir",
           "atomic_file", "copy_aux", "load_model", "write_folder", "write_model_card"]
