"""Write a model's `.weights.h5` tensor by tensor, in Keras' own layout.

Keras' `save_weights` turns each variable into a whole numpy copy (two
when it shards; on JAX also a third while converting), which for the
2.4 GB float32 token embedding of PaliGemma 2 3B adds several GB to the
peak memory of a conversion. `save_weights` here lets Keras walk the model
exactly as its own saver does (so every h5 group and dataset name is the
one `load_weights` looks for) but only records the variables, then writes
each one into its dataset a block of rows at a time. The files it writes
(one `.weights.h5`, or `.weights.json` plus `_00000.weights.h5` shards)
load with `model.load_weights` and keras-hub's `from_preset`.

`save_preset(model, preset_dir)` is `model.save_to_preset(preset_dir)`
with this writer in place of Keras' one.
"""

import io
import json
import os

import h5py
import keras
from keras.src.saving import saving_lib

from keras_paligemma.checkpoints.in_place import numpy_dtype
from keras_paligemma.checkpoints.in_place import release_freed_memory
from keras_paligemma.checkpoints.in_place import rows_per_block


class _Recorder(saving_lib.H5IOStore):
    """A weights store that records what Keras' saver gives it, in order.

    Keras' traversal (`saving_lib._save_state`) only accepts its own store
    classes, hence the subclass; nothing is written to its (in-memory) file.
    """

    def __init__(self):
        super().__init__(io.BytesIO(), mode="w")
        self.groups = []

    def make(self, path, metadata=None):
        self.groups.append((path, metadata or {}, {}))
        return self

    def __setitem__(self, key, value):
        self.groups[-1][2][key] = value


def keras_layout(model):
    """`[(h5 group, attributes, {dataset: variable})]` as Keras saves `model`.

    Groups are in Keras' saving order; those without variables are left out
    (loading treats a missing group as an empty one).
    """
    if not model.built:
        raise ValueError(f"`{model.name}` is not built: there are no weights to save.")
    recorder = _Recorder()
    try:
        saving_lib._save_state(
            model,
            weights_store=recorder,
            assets_store=None,
            inner_path="",
            visited_saveables=set(),
        )
    finally:
        recorder.close()
    return [
        (f"{path}/vars" if path else "vars", attributes, values)
        for path, attributes, values in recorder.groups
        if values
    ]


def save_weights(model, filepath, max_shard_size=None):
    """`model.save_weights(filepath, max_shard_size)`, one block at a time.

    Args:
        model: a built Keras model (or layer).
        filepath: `*.weights.h5`, or `*.weights.json` with `max_shard_size`.
        max_shard_size: `None` for one file, else the size in GB (1024**3
            bytes) of each shard; a layer's variables stay in one shard, so
            a shard exceeds it only when a single layer does.
    """
    filepath = str(filepath)
    layout = keras_layout(model)
    if max_shard_size is None:
        if not filepath.endswith(".weights.h5"):
            raise ValueError(
                f"The weights file name must end in `.weights.h5`; got `{filepath}`."
            )
        with h5py.File(filepath, "w") as f:
            for group, attributes, values in layout:
                _write_group(f, group, attributes, values)
        return
    if not filepath.endswith(".weights.json"):
        raise ValueError(
            "With `max_shard_size`, the weights file name must end in "
            f"`.weights.json`; got `{filepath}`."
        )
    _write_shards(filepath, layout, float(max_shard_size) * 1024**3)


def _write_shards(filepath, layout, limit):
    """Shards named and mapped as Keras' `ShardedH5IOStore` does."""
    directory = os.path.dirname(filepath)
    base = os.path.basename(filepath)[: -len(".weights.json")]
    weight_map, total, size, shard, f = {}, 0, 0, -1, None
    try:
        for group, attributes, values in layout:
            nbytes = sum(_nbytes(value) for value in values.values())
            if f is None or (size and size + nbytes > limit):
                if f is not None:
                    f.close()
                shard, size = shard + 1, 0
                name = f"{base}_{shard:05}.weights.h5"
                f = h5py.File(os.path.join(directory, name), "w")
            _write_group(f, group, attributes, values)
            weight_map[f"/{group}"] = name
            size += nbytes
            total += nbytes
    finally:
        if f is not None:
            f.close()
    with open(filepath, "w") as index:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  index, indent=4)


def _nbytes(value):
    dtype = numpy_dtype(keras.backend.standardize_dtype(value.dtype))
    count = 1
    for dim in value.shape:
        count *= int(dim)
    return count * dtype.itemsize


def _write_group(h5_file, group_path, attributes, values):
    group = h5_file.require_group(group_path)
    for key, attribute in attributes.items():
        group.attrs[key] = attribute
    for key, value in values.items():
        _write_dataset(group, key, value)
        release_freed_memory()


def _write_dataset(group, key, value):
    """One variable as Keras writes it (bfloat16 tagged), block by block."""
    dtype = keras.backend.standardize_dtype(value.dtype)
    shape = tuple(int(dim) for dim in value.shape)
    dataset = group.create_dataset(key, shape=shape, dtype=numpy_dtype(dtype))
    if dtype == "bfloat16":
        dataset.attrs["dtype"] = "bfloat16"
    if not shape:
        dataset[()] = keras.ops.convert_to_numpy(value)
        return
    rows = rows_per_block(shape, dataset.dtype.itemsize)
    for start in range(0, shape[0], rows):
        dataset[start : start + rows] = keras.ops.convert_to_numpy(
            value[start : start + rows]
        )


def save_preset(model, preset_dir, overwrite=False, max_shard_size=10):
    """`model.save_to_preset(...)` writing the weights with `save_weights`.

    keras-hub's preset saver writes the configs and assets, then calls
    `backbone.save_weights`; for the duration of the call that method is
    this module's streaming writer.

    Args:
        model: a `PaliGemmaBackbone` or `PaliGemmaCausalLM`.
        preset_dir: directory to write (missing or empty unless
            `overwrite`).
        overwrite: replace the files of an existing preset.
        max_shard_size: shard size in GB, as in `save_to_preset`.
    """
    backbone = getattr(model, "backbone", model)

    def streaming_save_weights(filepath, max_shard_size=None):
        save_weights(backbone, filepath, max_shard_size=max_shard_size)

    backbone.save_weights = streaming_save_weights
    try:
        model.save_to_preset(
            preset_dir, max_shard_size=max_shard_size, overwrite=overwrite
        )
    finally:
        del backbone.save_weights
