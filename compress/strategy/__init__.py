"""Strategy prediction: UniCuCo (Ye & Tang 2025, "Universal Model for Customized Compression"). A StratNet maps a
compression request (a sparsity, a size budget in bytes, or a size/quality preference) to a per-block pruning
strategy, trained once through the gradient of a GP surrogate of the true evaluation (prune, then KL to the dense
model), instead of searching each request.

Modules: ``request`` (the request schema, requests files), ``project`` (the exact budget projection, size budget →
sparsity), ``evaluate`` (the true evaluation), ``surrogate`` (the GP and its space-filling design), ``stratnet``
(the network, its file, training through the GP), ``search`` (the per-request CMA-ES/BO baseline), ``train``
(`compress strategy train|search`), ``batch`` (`compress batch`).
"""

from compress.config import CompressionRequest

__all__ = ["CompressionRequest"]
