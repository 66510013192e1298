"""compress: compress and recombine fine-tuned transformer checkpoints.

The data flow (see DESIGN.md): checkpoints are opened lazily (``compress.io``), turned into task vectors
(``compress.taskvec``), sparsified (``compress.sparsify``), stored as compact deltas (``compress.delta``) or
LoRA adapters (``compress.io.lora``), and written back as Hugging Face folders (``compress.io.writer``).
"""

__version__ = "0.1.0"

from compress.errors import CompressError  # noqa: F401
