"""Checkpoint I/O: lazy readers (``reader``), streaming atomic writers (``writer``: ``write_folder`` writes every
model), the model loader (``models``), PEFT LoRA adapters (``lora``) and the llama2.c converter (``llama2c``)."""

from compress.lazy import lazy_exports

_EXPORTS = {
    "Checkpoint": "compress.io.reader",
    "TensorInfo": "compress.io.reader",
    "is_peft_adapter": "compress.io.reader",
    "open_checkpoint": "compress.io.reader",
    "ShardedWriter": "compress.io.writer",
    "atomic_dir": "compress.io.writer",
    "atomic_file": "compress.io.writer",
    "copy_aux": "compress.io.writer",
    "write_model_card": "compress.io.writer",
    "write_folder": "compress.io.writer",
    "load_model": "compress.io.models",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
