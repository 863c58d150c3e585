"""MoE FFN kernels, one backend per file: `grouped` (sort once, contiguous segments, batched
GEMMs, one weighted scatter) and `decode` (small T: only the active experts' weights, once).

Every kernel has the signature of `reference.reference_moe` and is grid-tested against it.
"""
