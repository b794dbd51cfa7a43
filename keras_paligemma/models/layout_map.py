"""How `PaliGemmaBackbone` weights are split over a device mesh.

`backbone_layout_map` returns a `keras.distribution.LayoutMap` for
`keras.distribution.ModelParallel` (JAX only in Keras 3). It follows the
Megatron split that keras-hub's Gemma layout also uses: the *model* axis
cuts the vocabulary, the attention heads and the feed-forward width, so
each device holds whole heads and a slice of every matmul; the *batch*
(data) axis cuts the other, hidden-width dimension of the same kernels, so
a mesh with several data-parallel replicas also spreads the weights and
optimizer state (FSDP-style) instead of copying them.

| weight (shape)                                  | split             |
| ----------------------------------------------- | ----------------- |
| `token_embedding/embeddings` (vocab, hidden)    | (model, batch)    |
| decoder `query` (heads, head_dim, hidden)       | (model, -, batch) |
| decoder `key`, `value` (kv_heads, hd, hidden)   | (-, -, model)     |
| decoder `attention_output` (hidden, heads, hd)  | (batch, model, -) |
| decoder `gate`, `up` (ffw, hidden)              | (model, batch)    |
| decoder `down` (hidden, ffw)                    | (batch, model)    |
| SigLIP `query`/`key`/`value` (width, heads, hd) | (batch, model, -) |
| SigLIP `attention_output` (heads, hd, width)    | (model, -, batch) |
| SigLIP `mlp_in` (width, mlp)                    | (batch, model)    |
| SigLIP `mlp_out` (mlp, width)                   | (model, batch)    |
| `vision_encoder/projector/kernel` (width, hid.) | (batch, model)    |

Keys and values are split on their input width, not on their heads:
PaliGemma 1 has a single key/value head. Everything else (norms, biases,
the patch and position embeddings, LoRA weights) is replicated; together
it is well under 1% of the parameters.

Every split dimension must be divisible by the size of its mesh axis. The
model axis must divide the query heads (8 for the 3B models, 16 for 10B,
32 for 28B) and SigLIP's 16 heads and 4304-wide MLP: 1, 2, 4 or 8 for 3B,
up to 16 for 10B and 28B. The batch axis must divide SigLIP's width, 1152,
and the decoder width: any power of two up to 128.
"""

import keras


def backbone_layout_map(
    device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
):
    """A `keras.distribution.LayoutMap` for `PaliGemmaBackbone` weights.

    Also reachable as `PaliGemmaBackbone.get_layout_map`. Set the
    distribution before the model is built (`from_preset` included): the
    weights are then created, and loaded, directly in their shards.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with both named axes.
        model_parallel_dim_name: mesh axis splitting heads, FFW width and
            vocabulary (tensor parallelism).
        data_parallel_dim_name: mesh axis the batch is split on; weights
            are also split on it along their hidden width.

    Returns:
        A `keras.distribution.LayoutMap` keyed by variable-path regexes.

    Example:

    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     shape=(1, 1), axis_names=("batch", "model"), devices=["cpu:0"])
    >>> layout_map = backbone_layout_map(mesh)
    >>> layout_map["decoder_block_3/attention/query/kernel"].axes
    ('model', None, 'batch')
    >>> layout_map["decoder_block_3/down/kernel"].axes
    ('batch', 'model')
    >>> print(layout_map["decoder_block_3/pre_ffw_norm/scale"])
    None

    On 8 accelerators, 2 data-parallel replicas of a 4-way split model
    (JAX backend):

    ```python
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4), axis_names=("batch", "model"),
        devices=keras.distribution.list_devices())
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=PaliGemmaBackbone.get_layout_map(mesh),
        batch_dim_name="batch"))
    causal_lm = PaliGemmaCausalLM.from_preset("pali_gemma2_mix_10b_448")
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`; got "
            f"{type(device_mesh).__name__}."
        )
    names = {
        "model_parallel_dim_name": model_parallel_dim_name,
        "data_parallel_dim_name": data_parallel_dim_name,
    }
    for argument, axis in names.items():
        if axis not in device_mesh.axis_names:
            raise ValueError(
                f"`{argument}={axis!r}` is not an axis of `device_mesh`, "
                f"whose axes are {list(device_mesh.axis_names)}."
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise ValueError(
            "`model_parallel_dim_name` and `data_parallel_dim_name` must "
            f"name different mesh axes; both are {model_parallel_dim_name!r}."
        )
    model, batch = model_parallel_dim_name, data_parallel_dim_name
    decoder = r"decoder_block_\d+/"
    vision = r"vision_encoder/block_\d+/"
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["token_embedding/embeddings"] = (model, batch)
    # The decoder's kernels are stored output-first (`kernel_layout.py`).
    layout_map[decoder + "attention/query/kernel"] = (model, None, batch)
    layout_map[decoder + "attention/(key|value)/kernel"] = (None, None, model)
    layout_map[decoder + "attention/attention_output/kernel"] = (
        batch,
        model,
        None,
    )
    layout_map[decoder + "(gate|up)/kernel"] = (model, batch)
    layout_map[decoder + "down/kernel"] = (batch, model)
    layout_map[vision + "(query|key|value)/kernel"] = (batch, model, None)
    layout_map[vision + "attention_output/kernel"] = (model, None, batch)
    layout_map[vision + "mlp_in/kernel"] = (batch, model)
    layout_map[vision + "mlp_out/kernel"] = (model, batch)
    layout_map["vision_encoder/projector/kernel"] = (batch, model)
    return layout_map
