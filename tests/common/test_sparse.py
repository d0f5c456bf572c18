"""CSR storage of SAE activations: exact round trip at awkward widths."""

import h5py
import numpy as np
import pytest
import torch

from common.sparse import read_csr, to_csr, write_csr


@pytest.mark.parametrize("width", [48, 64, 65536, 65537])
def test_round_trip_equals_dense(tmp_path, width):
    dense = torch.zeros(7, width)
    rng = np.random.default_rng(width)
    for row in (0, 2, 3, 6):  # rows 1, 4, 5 stay empty
        cols = rng.choice(width, size=min(5, width), replace=False)
        dense[row, cols] = torch.from_numpy(rng.random(len(cols)).astype(np.float32)) + 0.1
    with h5py.File(tmp_path / "f.h5", "w") as f:
        group = write_csr(f, "feat", to_csr(dense))
        assert group["indices"].dtype == (np.uint16 if width <= 65536 else np.uint32)
    with h5py.File(tmp_path / "f.h5") as f:
        back = read_csr(f["feat"])
    assert back.shape == (7, width)
    np.testing.assert_array_equal(back.toarray(), dense.numpy())


def test_float16_values_are_stored_rounded_and_read_back_as_float32(tmp_path):
    dense = torch.tensor([[0.0, 1.0 / 3.0, 0.0], [2.5, 0.0, 0.0]])
    with h5py.File(tmp_path / "f.h5", "w") as f:
        assert write_csr(f, "feat", to_csr(dense), "float16")["data"].dtype == np.float16
    with h5py.File(tmp_path / "f.h5") as f:
        back = read_csr(f["feat"])
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.toarray(), dense.numpy().astype(np.float16).astype(np.float32))


def test_to_csr_rejects_3d():
    with pytest.raises(ValueError, match="2-d"):
        to_csr(torch.zeros(2, 3, 4))
