"""Low-rank linear algebra shared by the strategies and the checks: products B·A handled through
their factors, reproducibly (one BLAS thread, pinned singular-vector signs)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

_BLAS_THREADS: tuple[Any, Any] | None | bool = False  # False: not looked up yet


def _openblas_threads() -> tuple[Any, Any] | None:
    """numpy's OpenBLAS thread getter/setter, found among the loaded libraries (Linux), or None."""
    global _BLAS_THREADS
    if _BLAS_THREADS is False:
        _BLAS_THREADS = None
        try:
            with open("/proc/self/maps", encoding="utf-8") as fh:
                paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower()})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for stem in (
                "scipy_openblas_{}64_",
                "openblas_{}64_",
                "scipy_openblas_{}",
                "openblas_{}",
            ):
                get = getattr(lib, stem.format("get_num_threads"), None)
                set_ = getattr(lib, stem.format("set_num_threads"), None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    _BLAS_THREADS = (get, set_)
                    return _BLAS_THREADS
    return _BLAS_THREADS or None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS/LAPACK on one thread inside the block.

    The factorizations here are tall and skinny (out × N·r), where threads gain little, while a
    multi-threaded OpenBLAS on a busy host can be 30× slower (spinning threads) and its results
    depend on the thread count; one thread keeps them fast and bit-reproducible.
    """
    threads = _openblas_threads()
    if threads is None:
        yield
        return
    get, set_ = threads
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _fix_signs(u: np.ndarray, v: np.ndarray) -> None:
    """Make the largest-magnitude entry of each column of ``u`` positive (flipping ``v`` too).

    Singular vectors are defined up to sign; pinning it makes the factors reproducible. A zero
    column of ``u`` (a null direction) takes its sign from ``v`` instead.
    """
    if u.shape[1] == 0:
        return
    cols = np.arange(u.shape[1])
    ref = np.where(np.abs(u).max(axis=0) > 0, u[np.argmax(np.abs(u), axis=0), cols], 0.0)
    ref = np.where(ref == 0, v[np.argmax(np.abs(v), axis=0), cols], ref)
    signs = np.where(ref < 0, -1.0, 1.0)
    u *= signs
    v *= signs


def lowrank_svd(
    b_cat: np.ndarray, a_cat: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets of ``b_cat @ a_cat`` (out×K · K×in, K small), and all
    its singular values, without forming the out×in product.

    With B = Q_b R_b and Aᵀ = Q_a R_a (QR), B·A = Q_b (R_b R_aᵀ) Q_aᵀ, so the singular values are
    those of the K×K core M = U_m S V_mᵀ. The leading vectors follow without forming Q:
    U_k S_k = B·R_aᵀ·V_m,k and V_k S_k = Aᵀ·R_bᵀ·U_m,k. Cost O((out+in)·K²) instead of
    O(out·in·min(out, in)) for a dense SVD. Directions whose singular value is at rounding level
    are null: their U column is zero and their V column comes from Q_a (an orthonormal
    completion). Returns U (out×k), S (all), V (in×k), k = min(rank, len(S)), signs pinned.
    """
    r_b = np.linalg.qr(b_cat, mode="r")
    r_a = np.linalg.qr(a_cat.T, mode="r")
    u_m, s, vt_m = np.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.size)
    tol = (s[0] if s.size else 0.0) * max(*b_cat.shape, *a_cat.shape) * np.finfo(np.float64).eps
    live = s[:k] > tol
    us = b_cat @ (r_a.T @ vt_m[:k].T)
    vs = a_cat.T @ (r_b.T @ u_m[:, :k])
    u = np.zeros_like(us)
    v = np.zeros_like(vs)
    u[:, live] = us[:, live] / s[:k][live]
    v[:, live] = vs[:, live] / s[:k][live]
    if not live.all():
        q_a = np.linalg.qr(a_cat.T)[0]
        v_all = q_a @ vt_m[:k].T
        v[:, ~live] = v_all[:, ~live]
    _fix_signs(u, v)
    return u, s, v
