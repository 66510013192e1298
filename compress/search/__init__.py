"""Gradient-free search over task-vector subspaces (NPS-Pruning, Du et al. 2025): partitions, optimizers
(CMA-ES through ``cma``, Bayesian optimization through ``botorch``), objectives from the evaluators, and the NPS
procedure for compression, interpolation and merging."""
