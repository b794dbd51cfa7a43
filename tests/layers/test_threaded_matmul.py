"""Decode-sized matmuls over contiguous weight blocks equal Keras' own layers."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_paligemma.layers import onednn
from keras_paligemma.layers import row_product
from keras_paligemma.layers import threaded_matmul as tm
from keras_paligemma.layers.reversible_embedding import ReversibleEmbedding
from keras_paligemma.layers.reversible_embedding import int8_matmul_by_blocks
from keras_paligemma.layers.threaded_dense import ThreadedDense
from keras_paligemma.layers.threaded_dense import ThreadedEinsumDense
from keras_paligemma.layers.threaded_matmul import threaded_matmul

RNG = np.random.default_rng(0)


def numpy(x):
    return ops.convert_to_numpy(x)


@pytest.fixture
def paths(monkeypatch):
    """The fast paths taken (torch only): "onednn", or "blocks" /
    "strided blocks" for a batched matmul whose larger operand (the weight
    blocks) does / does not hold each block as one contiguous array (or
    the transpose of one)."""
    if keras.config.backend() != "torch":
        yield None
        return
    import torch

    calls = []
    real_bmm = torch.bmm

    def recording_bmm(a, b):
        block = (a if a.numel() >= b.numel() else b)[0]
        whole = block.is_contiguous() or block.T.is_contiguous()
        calls.append("blocks" if whole else "strided blocks")
        return real_bmm(a, b)

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    # Which of oneDNN and MKL multiplies kernels faster depends on the
    # machine: these tests take oneDNN (see the MKL test below).
    monkeypatch.setattr(onednn, "beats_mkl", lambda: True)
    # Which side of `torch.bmm` one row takes is measured too (see
    # test_row_product.py): these tests put the rows on the left.
    monkeypatch.setattr(row_product, "table_on_left", lambda *_: False)
    linear = onednn.linear()
    if linear is not None:
        recording_linear = lambda x, k: calls.append("onednn") or linear(x, k)
        monkeypatch.setattr(onednn, "linear", lambda: recording_linear)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield calls
    torch.set_num_threads(previous)


def onednn_or(fallback):
    """What a float32 product of 2+ rows outside autograd takes."""
    return ["onednn"] if onednn.linear() is not None else fallback


@pytest.mark.parametrize("rows", [1, 8, tm.MAX_ROWS + 1])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("autograd", [False, True])
def test_threaded_matmul_equals_matmul(rows, transposed, autograd, paths):
    kernel = RNG.normal(size=(12, 40)).astype("float32")
    if transposed:  # the tied embedding's (vocabulary, hidden) transposed
        kernel = ops.transpose(ops.convert_to_tensor(kernel.T.copy()))
    x = RNG.normal(size=(rows, 1, 12)).astype("float32")
    if paths is None:
        if autograd:
            pytest.skip("autograd paths are PyTorch's")
        out = threaded_matmul(x, kernel)
        np.testing.assert_allclose(numpy(out), x @ numpy(kernel), atol=1e-5)
        return
    import torch

    kernel = torch.tensor(numpy(kernel))
    weights = (kernel.T.contiguous() if transposed else kernel).requires_grad_(autograd)
    kernel = weights.T if transposed else weights
    x_tensor = torch.from_numpy(x).requires_grad_(autograd)
    out = threaded_matmul(x_tensor, kernel)
    assert tuple(out.shape) == (rows, 1, 40)
    np.testing.assert_allclose(numpy(out.detach()), x @ numpy(kernel.detach()), atol=1e-5)
    blocks = ["blocks"] if rows <= tm.MAX_ROWS else []
    if autograd:
        assert paths == blocks
        out.sum().backward()  # the block path is differentiable
        kernel_grad = np.broadcast_to(x.sum((0, 1))[:, None], (12, 40))
        x_grad = np.broadcast_to(numpy(kernel.detach()).sum(1), x.shape)
        np.testing.assert_allclose(numpy(x_tensor.grad), x_grad, atol=1e-4)
        weights_grad = kernel_grad.T if transposed else kernel_grad
        np.testing.assert_allclose(numpy(weights.grad), weights_grad, atol=1e-4)
    else:
        assert paths == (blocks if rows == 1 else onednn_or(blocks))


def test_where_mkl_is_faster_kernels_take_it_and_the_table_onednn(
    paths, monkeypatch
):
    if paths is None:
        pytest.skip("oneDNN and MKL are PyTorch CPU paths")
    if onednn.linear() is None:
        pytest.skip("this PyTorch build has no oneDNN linear")
    import torch

    monkeypatch.setattr(onednn, "beats_mkl", lambda: False)
    x = RNG.normal(size=(8, 1, 12)).astype("float32")
    kernel = torch.from_numpy(RNG.normal(size=(12, 40)).astype("float32"))
    table = kernel.T.contiguous()
    with torch.no_grad():
        np.testing.assert_allclose(
            numpy(threaded_matmul(x, kernel)), x @ numpy(kernel), atol=1e-5
        )
        np.testing.assert_allclose(  # an output-first kernel
            numpy(threaded_matmul(x, table, transposed=True)),
            x @ numpy(kernel),
            atol=1e-5,
        )
        assert paths == []  # torch.matmul, twice
        np.testing.assert_allclose(
            numpy(threaded_matmul(x, table.T)), x @ numpy(kernel), atol=1e-5
        )
        assert paths == ["onednn"]


def test_layouts_and_half_precision(paths):
    """Strided 4-D inputs on every path; bfloat16 kernels in column blocks
    (a split of the contraction would round each partial sum)."""
    if paths is None:
        pytest.skip("the block and oneDNN paths are PyTorch CPU paths")
    import torch

    kernel = torch.tensor(RNG.normal(size=(12, 40)).astype("float32"))
    for rows in (1, 3):
        x = torch.tensor(RNG.normal(size=(2, 12, rows, 1)).astype("float32"))
        x = x.permute(0, 3, 2, 1)  # (2, 1, rows, 12), not contiguous
        with torch.no_grad():
            out = threaded_matmul(x, kernel)
        np.testing.assert_allclose(numpy(out), numpy(x) @ numpy(kernel), atol=1e-5)
    paths.clear()
    x16, kernel16 = x[:1, :, :1].bfloat16(), kernel.bfloat16()
    with torch.no_grad():
        out = threaded_matmul(x16, kernel16)
    assert paths == ["strided blocks"] and out.dtype == torch.bfloat16
    expected = numpy((x16.float() @ kernel16.float()))
    np.testing.assert_allclose(numpy(out.float()), expected, rtol=2e-2, atol=2e-2)


def test_blocks_need_a_divisible_split(paths):
    if paths is None:
        pytest.skip("weight blocks are a PyTorch CPU path")
    import torch

    assert tm._thread_blocks(10) == 2
    assert tm._thread_blocks(7) == 1
    x = RNG.normal(size=(1, 7)).astype("float32")
    odd_sides = RNG.normal(size=(7, 7)).astype("float32")
    odd_table = torch.from_numpy(RNG.normal(size=(7, 7)).astype("float32")).T
    strided = torch.from_numpy(RNG.normal(size=(7, 24)).astype("float32"))[:, ::2]
    for kernel in (odd_sides, odd_table, strided):  # each takes torch.matmul
        expected = x @ numpy(kernel)
        np.testing.assert_allclose(numpy(threaded_matmul(x, kernel)), expected, atol=1e-5)
    assert paths == []
    odd_depth = RNG.normal(size=(7, 12)).astype("float32")  # column blocks
    np.testing.assert_allclose(
        numpy(threaded_matmul(x, odd_depth)), x @ odd_depth, atol=1e-5
    )
    assert paths == ["strided blocks"]


@pytest.mark.parametrize(
    "equation, input_shape, output_shape",
    [
        ("btd,dnh->btnh", (2, 1, 12), (None, 3, 4)),
        ("btnh,nhd->btd", (2, 1, 3, 4), (None, 12)),
        ("btd,df->btf", (2, 3, 12), (None, 10)),
        ("btd,nhd->btnh", (2, 1, 12), (None, 3, 4)),  # output-first kernels
        ("btnh,dnh->btd", (2, 1, 3, 4), (None, 12)),
        ("btd,fd->btf", (2, 3, 12), (None, 10)),
        ("btd,dnh->bnth", (2, 1, 12), (3, None, 4)),  # not a plain matmul
    ],
)
def test_threaded_einsum_dense_equals_einsum_dense(
    equation, input_shape, output_shape, paths
):
    ours = ThreadedEinsumDense(equation, output_shape, bias_axes=None)
    theirs = keras.layers.EinsumDense(equation, output_shape)
    x = RNG.normal(size=input_shape).astype("float32")
    ours.build(input_shape)
    theirs.build(input_shape)
    theirs.kernel.assign(RNG.normal(size=theirs.kernel.shape).astype("float32"))
    ours.kernel.assign(theirs.kernel)
    np.testing.assert_allclose(numpy(ours(x)), numpy(theirs(x)), atol=1e-5)
    if paths is not None:  # trainable kernels: autograd, so blocks
        assert paths == ["blocks"] * (equation != "btd,dnh->bnth")

    for layer in (ours, theirs):  # LoRA adds to the kernel the block path reads
        layer.enable_lora(2, b_initializer="ones")
    ours.lora_kernel_a.assign(theirs.lora_kernel_a)
    np.testing.assert_allclose(numpy(ours(x)), numpy(theirs(x)), atol=1e-4)

    for layer in (ours, theirs):  # Keras quantizes the subclass as its own
        layer.quantize("int8")
    assert ours.quantization_mode == "int8"
    # Keras' int8 product plus the LoRA term, `x . (alpha / rank) A @ B`
    # (Keras' own int8 LoRA fails for output-first kernels).
    theirs.lora_enabled = False
    update = numpy(theirs.lora_kernel_a) @ numpy(theirs.lora_kernel_b)
    expected = numpy(theirs(x)) + np.einsum(equation, x, update)
    np.testing.assert_allclose(numpy(ours(x)), expected, atol=1e-4)


@pytest.mark.parametrize("equation", ["btd,dnh->btnh", "btd,dnh->bnth"])
def test_int8_einsum_dense_outside_autograd_equals_keras(equation, paths):
    """Generation's int8 product (float32 on torch) equals Keras' int32."""
    output_shape = (None, 3, 4) if equation.endswith("btnh") else (3, None, 4)
    ours = ThreadedEinsumDense(equation, output_shape)
    theirs = keras.layers.EinsumDense(equation, output_shape)
    kernel = RNG.normal(size=(12, 3, 4)).astype("float32")
    for layer in (ours, theirs):
        layer.build((2, 1, 12))
        layer.kernel.assign(kernel)
        layer.quantize("int8")
    x = RNG.normal(size=(2, 1, 12)).astype("float32")
    if paths is None:
        np.testing.assert_allclose(numpy(ours(x)), numpy(theirs(x)), atol=1e-5)
        return
    import torch

    with torch.no_grad():
        out, expected = numpy(ours(x)), numpy(theirs(x))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    plain_matmul = equation == "btd,dnh->btnh"
    assert paths == (onednn_or(["blocks"]) if plain_matmul else [])


def test_reversible_embedding_matches_and_loads_keras_weights(tmp_path):
    def model(embedding_class):
        tokens = keras.Input((3,), dtype="int32")
        embedding = embedding_class(10, 4, logit_soft_cap=2.0)
        return keras.Model(tokens, embedding(embedding(tokens), reverse=True))

    theirs, ours = model(keras.layers.ReversibleEmbedding), model(ReversibleEmbedding)
    theirs.save_weights(tmp_path / "keras.weights.h5")
    ours.load_weights(tmp_path / "keras.weights.h5")  # same class name
    tokens = np.array([[1, 5, 9]], dtype="int32")
    logits = numpy(ours(tokens))
    np.testing.assert_allclose(logits, numpy(theirs(tokens)), atol=1e-5)
    assert np.abs(logits).max() < 2.0  # soft-capped

    for layer in (ours.layers[1], theirs.layers[1]):
        layer.quantize("int8")
    assert ours.layers[1].quantization_mode == "int8"
    np.testing.assert_allclose(numpy(ours(tokens)), numpy(theirs(tokens)), atol=1e-5)


def test_int8_matmul_by_blocks_equals_int32_product():
    if keras.config.backend() != "torch":
        pytest.skip("Keras' own int8 product is used off PyTorch")
    x = RNG.integers(-127, 128, size=(2, 1, 16)).astype("int8")
    table = RNG.integers(-127, 128, size=(10, 16)).astype("int8")
    out = int8_matmul_by_blocks(x, table, block_bytes=3 * 16 * 4)  # 4 blocks
    expected = x.astype("int32") @ table.T.astype("int32")
    np.testing.assert_array_equal(numpy(out), expected)


def test_mixed_dtypes_promote_as_matmul():
    """bfloat16 activations against float32 weights (mixed precision)."""
    x = ops.cast(RNG.normal(size=(1, 1, 12)).astype("float32"), "bfloat16")
    kernel = RNG.normal(size=(12, 10)).astype("float32")
    out = threaded_matmul(x, kernel)
    expected = ops.matmul(x, kernel)
    assert ops.dtype(out) == ops.dtype(expected) == "float32"
    np.testing.assert_allclose(numpy(out), numpy(expected), atol=1e-4)


@pytest.mark.parametrize("rows", [1, 256])
def test_threaded_dense_equals_dense_float_and_int8(rows, paths):
    """SigLIP's `Dense` layers: float and int8 (as float32 in generation)."""
    ours, theirs = ThreadedDense(10), keras.layers.Dense(10)
    kernel = RNG.normal(size=(12, 10)).astype("float32")
    for layer in (ours, theirs):
        layer.build((None, rows, 12))
        layer.kernel.assign(kernel)
        layer.bias.assign(np.arange(10, dtype="float32"))
    x = RNG.normal(size=(1, rows, 12)).astype("float32")
    np.testing.assert_allclose(numpy(ours(x)), numpy(theirs(x)), atol=1e-4)
    for layer in (ours, theirs):
        layer.quantize("int8")
    assert ours.quantization_mode == "int8"
    if paths is None:
        np.testing.assert_allclose(numpy(ours(x)), numpy(theirs(x)), atol=1e-4)
        return
    import torch

    paths.clear()
    with torch.no_grad():
        out, expected = numpy(ours(x)), numpy(theirs(x))
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert paths == (["blocks"] if rows == 1 else onednn_or([]))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transposed_kernels_are_read_in_place(rows, dtype, paths):
    """`x @ kernel.T` for an output-first `(N, K)` kernel: on PyTorch CPU in
    contiguous blocks of its rows (one row, or bfloat16) or by oneDNN
    (float32 rows, outside autograd), never a copy of the kernel."""
    kernel = RNG.normal(size=(40, 12)).astype("float32")
    x = RNG.normal(size=(2, rows, 12)).astype("float32")
    if paths is None:
        out = threaded_matmul(x, kernel, transposed=True)
        np.testing.assert_allclose(numpy(out), x @ kernel.T, atol=1e-5)
        return
    import torch

    torch_x = torch.tensor(x[:1]).to(getattr(torch, dtype))
    with torch.no_grad():
        out = threaded_matmul(torch_x, torch.tensor(kernel).to(torch_x.dtype), transposed=True)
    expected = torch_x.float().numpy() @ torch.tensor(kernel).to(torch_x.dtype).float().numpy().T
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(numpy(out.float()), expected, rtol=tolerance, atol=tolerance)
    one_product = onednn_or(["blocks"]) if dtype == "float32" else ["blocks"]
    assert paths == (["blocks"] if rows == 1 else one_product)


@pytest.mark.parametrize("with_lora", [False, True])
def test_int4_quantizes_output_first_kernels_per_output_channel(with_lora):
    """Keras' int4 flattens the kernel as (contracted, kept): an output-first
    kernel is transposed to that layout first, so each scale covers one
    output channel, and its LoRA term is Keras' own."""
    hidden, ffw = 64, 48
    scales = np.geomspace(0.01, 10, ffw).astype("float32")[:, None]
    kernel = (RNG.normal(size=(ffw, hidden)) * scales).astype("float32")
    x = RNG.normal(size=(2, 3, hidden)).astype("float32")
    ours = ThreadedEinsumDense("btd,fd->btf", (None, ffw))
    ours.build(x.shape)
    ours.kernel.assign(kernel)
    ours.quantize("int4")
    assert ours.equation == "btd,df->btf"
    out = numpy(ours(x))
    expected = x @ kernel.T
    per_channel = np.abs(out - expected).mean((0, 1)) / np.abs(expected).mean((0, 1))
    assert np.median(per_channel) < 0.2  # mixed groups measured 0.44
    if with_lora:
        ours.enable_lora(2, b_initializer="ones")
        update = numpy(ours.lora_kernel_a) @ numpy(ours.lora_kernel_b)
        np.testing.assert_allclose(numpy(ours(x)), out + x @ update, atol=1e-4)


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="TensorFlow's product"
)
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16, None])
@pytest.mark.parametrize("big_kernel", [False, True])
def test_tensorflow_batches_output_first_kernels_for_many_rows(
    rows, big_kernel, monkeypatch
):
    """Many rows, or a few rows times a big kernel, take the batched
    matmul (an unknown count does not); the result equals `x @ kernel.T`,
    and so does its gradient."""
    import tensorflow as tf

    if big_kernel:
        monkeypatch.setattr(tm, "TENSORFLOW_BIG_KERNEL", 40 * 12)
    batched = []
    real_matmul = tf.linalg.matmul

    def recording_matmul(a, b, **kwargs):
        batched.append(len(a.shape) == 3)
        return real_matmul(a, b, **kwargs)

    monkeypatch.setattr(tf.linalg, "matmul", recording_matmul)
    kernel = tf.constant(RNG.normal(size=(40, 12)).astype("float32"))
    x = RNG.normal(size=(rows or 5, 1, 12)).astype("float32")
    product = tf.function(
        lambda x: threaded_matmul(x, kernel, transposed=True),
        input_signature=[tf.TensorSpec((rows, 1, 12), "float32")],
    )
    np.testing.assert_allclose(
        numpy(product(x)), x @ numpy(kernel).T, rtol=1e-5, atol=1e-5
    )
    many = rows is not None and rows >= 16
    expected = many or (rows is not None and big_kernel and rows >= 4)
    assert batched == [expected]

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = threaded_matmul(x, kernel, transposed=True)
    gradient = tape.gradient(out, x)
    np.testing.assert_allclose(
        numpy(gradient),
        np.broadcast_to(numpy(kernel).sum(0), x.shape),
        rtol=1e-5,
        atol=1e-5,
    )
