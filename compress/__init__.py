"""compress: compress and recombine fine-tuned transformer checkpoints.

The data flow (see DESIGN.md): checkpoints are opened lazily (``compress.io``), turned into task vectors
(``compress.taskvec``), sparsified (``compress.sparsify``), stored as compact deltas (``compress.delta``) or
LoRA adapters (``compress.io.lora``), and written back as Hugging Face folders (``compress.io.writer``).
"""

__version__ = "0.1.0"

import os as _os

from compress.errors import CompressError  # noqa: F401

# torch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is set before torch
# starts: a streaming pass allocates every tensor afresh, and 4 KiB page faults were about half of a CPU merge's
# arithmetic (measured: allocating and filling 256 MB took 0.80 s without, 0.24 s with, on this project's 2 cores)
HUGE_PAGES_SET_HERE = "THP_MEM_ALLOC_ENABLE" not in _os.environ  # benchmarks give other tools the user's setting
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
