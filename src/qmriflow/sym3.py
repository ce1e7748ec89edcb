"""Closed-form solves of many symmetric 3 × 3 systems at once, by the adjugate.

The per-voxel Levenberg–Marquardt steps of the relaxometry calibration
(:func:`qmriflow.model.calibration.pinning._solve_normal`, NumPy) and of the fat/water fit
(:func:`qmriflow.cse.fit._lm_step`, torch) each solve one symmetric 3 × 3 system per voxel.
A batched LAPACK call spends most of its time on per-matrix overhead; written out on whole
arrays (one array per matrix entry, voxels along it) the adjugate is a few dozen elementwise
operations. Works on NumPy arrays and torch tensors alike (only ``+``, ``-``, ``*``). The
callers decide what a (near-)singular system means for them, from the determinant.
"""

from __future__ import annotations

from typing import Any

__all__ = ["sym3_adjugate", "sym3_apply"]


def sym3_adjugate(a00: Any, a01: Any, a02: Any, a11: Any, a12: Any, a22: Any
                  ) -> tuple[tuple[Any, Any, Any, Any, Any, Any], Any]:
    """Cofactors ``(c00, c01, c02, c11, c12, c22)`` (the adjugate, symmetric like the matrix)
    and the determinant of the symmetric matrices [[a00, a01, a02], [a01, a11, a12],
    [a02, a12, a22]]; A⁻¹ = adj(A) / det."""
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a02 * a01 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    return (c00, c01, c02, c11, c12, c22), det


def sym3_apply(cof: tuple[Any, Any, Any, Any, Any, Any], b0: Any, b1: Any, b2: Any
               ) -> tuple[Any, Any, Any]:
    """adj(A)·b for the cofactors ``cof`` of :func:`sym3_adjugate` (divide by the determinant
    for A⁻¹·b)."""
    c00, c01, c02, c11, c12, c22 = cof
    return (c00 * b0 + c01 * b1 + c02 * b2,
            c01 * b0 + c11 * b1 + c12 * b2,
            c02 * b0 + c12 * b1 + c22 * b2)
