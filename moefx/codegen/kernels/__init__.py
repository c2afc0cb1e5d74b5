"""Triton kernels of the moefx op, one stage per file; launched from ``moefx.codegen.launch``.

Stages: ``router`` (logits, scoring, top-k, dynamic-k, counts), ``permute`` (sorted slot map),
``grouped`` (up and down grouped GEMMs for many tokens), ``decode`` (per-slot GEMVs for a few
tokens), ``combine`` (fixed-order sum of the deterministic mode).
"""
