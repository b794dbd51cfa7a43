"""Decoder kernels are stored output-first; other formats' input-first."""

import numpy as np
import pytest

from keras_paligemma.layers.kernel_layout import from_input_first
from keras_paligemma.layers.kernel_layout import permutation
from keras_paligemma.layers.kernel_layout import to_input_first

# (path, input-first shape, stored shape) for hidden 8, 2 heads of 4, ffw 32.
KERNELS = [
    ("decoder_block_0/attention/query/kernel", (8, 2, 4), (2, 4, 8)),
    ("decoder_block_1/attention/key/kernel", (8, 1, 4), (1, 4, 8)),
    ("decoder_block_12/attention/value/kernel", (8, 1, 4), (1, 4, 8)),
    ("decoder_block_0/attention/attention_output/kernel", (2, 4, 8), (8, 2, 4)),
    ("decoder_block_0/gate/kernel", (8, 32), (32, 8)),
    ("decoder_block_0/up/kernel", (8, 32), (32, 8)),
    ("decoder_block_0/down/kernel", (32, 8), (8, 32)),
]


@pytest.mark.parametrize("path, input_first, stored", KERNELS)
def test_decoder_kernels_move_between_the_layouts(path, input_first, stored):
    array = np.arange(np.prod(input_first)).reshape(input_first)
    moved = from_input_first(path, array)
    assert moved.shape == stored
    assert np.shares_memory(moved, array)  # a view: no copy of a kernel
    np.testing.assert_array_equal(to_input_first(path, moved), array)


def test_the_stored_layout_contracts_the_last_axes():
    """The stored query kernel times `x` is Keras' einsum of the input-first
    kernel, contracting the hidden axis, now last."""
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(3, 8)), rng.normal(size=(8, 2, 4))
    stored = from_input_first("decoder_block_0/attention/query/kernel", kernel)
    np.testing.assert_allclose(
        np.einsum("bnhd,bd->bnh", stored[None], x),
        np.einsum("bd,dnh->bnh", x, kernel),
    )


@pytest.mark.parametrize(
    "path",
    [
        "vision_encoder/block_0/query/kernel",
        "vision_encoder/projector/kernel",
        "token_embedding/embeddings",
        "decoder_block_0/attention/query/lora_kernel_a",
        "decoder_block_0/pre_ffw_norm/scale",
    ],
)
def test_other_variables_keep_the_keras_layout(path):
    array = np.zeros((8, 2, 4))
    assert permutation(path) is None
    assert from_input_first(path, array) is array
    assert to_input_first(path, array) is array


def test_an_array_of_another_rank_is_left_for_the_shape_check():
    array = np.zeros((8, 16))
    assert from_input_first("decoder_block_0/attention/query/kernel", array) is array
