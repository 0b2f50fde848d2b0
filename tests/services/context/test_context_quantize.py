"""Vector codes of the context store: int8 and product quantization."""

from __future__ import annotations

import numpy as np
import pytest

from orion_fsm.services.context._quantize import ProductQuantizer, pack_int8, unpack_int8


def _clustered(n: int, dim: int = 384, seed: int = 3) -> np.ndarray:
    """Unit vectors around 40 topics, the way sentence embeddings of one corpus gather."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(40, dim))
    x = topics[rng.integers(0, 40, n)] + rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_int8_vectors_keep_the_direction_of_float_ones() -> None:
    vectors = _clustered(50)
    packed = [pack_int8(v) for v in vectors]
    assert {len(p) for p in packed} == {384 + 4}  # a quarter of float32, half of float16
    back = unpack_int8(packed)
    assert np.all(np.sum(back * vectors, axis=1) > 0.999)


def test_product_codes_are_a_byte_per_group_and_keep_the_nearest_neighbours() -> None:
    x = _clustered(1200)
    quantizer = ProductQuantizer.train(x[:600], dims_per_group=8)
    codes = quantizer.encode(x)
    assert codes.shape == (1200, 48) and codes.dtype == np.uint8
    back = quantizer.decode(codes)
    assert np.allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-5)
    assert float(np.mean(np.sum(back * x, axis=1))) > 0.8
    # Vectors it was not trained on are still found first by their own float vector.
    held_out = x[600:]
    found = np.argmax(held_out @ back[600:].T, axis=1)
    assert np.mean(found == np.arange(600)) > 0.98


def test_a_codebook_is_the_same_after_bytes_and_for_the_same_vectors() -> None:
    x = _clustered(400)
    first = ProductQuantizer.train(x, dims_per_group=8)
    again = ProductQuantizer.train(x, dims_per_group=8)
    assert np.array_equal(first.centroids, again.centroids)  # seeded
    back = ProductQuantizer.from_bytes(first.to_bytes(), groups=first.groups)
    assert len(first.to_bytes()) == 256 * 384 * 2  # float16 centroids
    assert np.array_equal(back.encode(x), first.encode(x))
    assert np.array_equal(back.decode(first.encode(x)), first.decode(first.encode(x)))


def test_too_few_vectors_or_an_uneven_split_cannot_train() -> None:
    assert not ProductQuantizer.fits(6, 8) and not ProductQuantizer.fits(388, 8)
    assert ProductQuantizer.fits(384, 8)
    with pytest.raises(ValueError, match="from 100 vectors"):
        ProductQuantizer.train(_clustered(100), dims_per_group=8)
