"""Sparse SAE activations on disk: CSR groups (data, indices, indptr, shape) in HDF5."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np
import scipy.sparse

from common.lazy import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

# Shuffle + gzip: sorted column indices and small floats compress well byte-plane by byte-plane.
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def to_csr(dense: torch.Tensor) -> scipy.sparse.csr_array:
    """(rows, features) activations -> float32 CSR on the CPU; only non-zeros leave the device."""
    if dense.ndim != 2:
        raise ValueError(f"to_csr expects a 2-d tensor, got shape {tuple(dense.shape)}")
    rows, cols = dense.nonzero(as_tuple=True)  # row-major order, as CSR needs
    values = dense[rows, cols].float().cpu().numpy()
    indptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64, device=dense.device)
    indptr[1:] = torch.bincount(rows, minlength=dense.shape[0]).cumsum(0)
    return scipy.sparse.csr_array(
        (values, cols.cpu().numpy(), indptr.cpu().numpy()), shape=tuple(dense.shape)
    )


def write_csr(
    parent: h5py.Group, name: str, matrix: scipy.sparse.csr_array, value_dtype: str = "float32"
) -> h5py.Group:
    """Store `matrix` as a group, values as `value_dtype`, indices in the smallest type that fits."""
    n_cols = matrix.shape[1]
    index_dtype = np.uint16 if n_cols <= np.iinfo(np.uint16).max + 1 else np.uint32
    group = parent.create_group(name)
    group.attrs["format"] = "csr"
    group.attrs["shape"] = np.asarray(matrix.shape, dtype=np.int64)
    group.create_dataset("data", data=matrix.data.astype(value_dtype), **COMPRESSION)
    group.create_dataset("indices", data=matrix.indices.astype(index_dtype), **COMPRESSION)
    group.create_dataset("indptr", data=matrix.indptr.astype(np.int64), **COMPRESSION)
    return group


def read_csr(group: h5py.Group) -> scipy.sparse.csr_array:
    """The stored matrix with float32 values (float16 values convert exactly; scipy lacks float16)."""
    if group.attrs.get("format") != "csr":
        raise ValueError(f"{group.name} is not a CSR group")
    shape = tuple(int(n) for n in group.attrs["shape"])
    data = group["data"][()].astype(np.float32)
    return scipy.sparse.csr_array((data, group["indices"][()].astype(np.int64), group["indptr"][()]), shape=shape)
