"""What every checkpoint converter shares: checked assignment, task assembly."""

from keras_paligemma.checkpoints.in_place import assign_in_place
from keras_paligemma.checkpoints.in_place import release_freed_memory
from keras_paligemma.layers.kernel_layout import from_input_first
from keras_paligemma.layers.kernel_layout import permutation


def assign_weights(backbone, assignments):
    """Assign converted arrays to the backbone's variables, checking all.

    Arrays may be in any float dtype (bfloat16 checkpoints stay bfloat16
    until written): each is converted block by block straight into its
    variable (`assign_in_place`) and dropped, and the freed memory is
    handed back (`release_freed_memory`), so loading holds the model plus
    about one checkpoint tensor.

    Args:
        backbone: the `PaliGemmaBackbone` to fill.
        assignments: iterable of `(our variable path, array, source name)`,
            kernels in the input-first layout of Keras and the other
            formats (`kernel_layout.py` stores the decoder's output-first).

    Raises:
        ValueError: an array maps to a variable the backbone lacks, its
            shape differs (both shapes and both names are given), or some
            variable received nothing.
    """
    variables = {v.path: v for v in backbone.weights}
    assigned = set()
    for path, array, source in assignments:
        variable = variables.get(path)
        if variable is None:
            raise ValueError(
                f"Checkpoint tensor `{source}` maps to `{path}`, which the "
                "backbone does not have: the config does not describe this "
                "checkpoint."
            )
        array = from_input_first(path, array)
        if tuple(variable.shape) != tuple(array.shape):
            raise ValueError(
                f"Shape mismatch for `{path}` (from `{source}`): the model "
                f"expects {tuple(variable.shape)}, the checkpoint has "
                f"{tuple(array.shape)}"
                + (" (both output-first)." if permutation(path) else ".")
            )
        assign_in_place(variable, array)
        del array  # Do not hold it while the next one is read.
        release_freed_memory()
        assigned.add(path)
    missing = sorted(set(variables) - assigned)
    if missing:
        raise ValueError(
            f"The checkpoint has no tensor for {len(missing)} variables, "
            f"e.g. {missing[:5]}."
        )


def causal_lm_with(backbone, vocabulary_proto, sequence_length=1024):
    """A `PaliGemmaCausalLM` around `backbone` with our preprocessing."""
    import keras_paligemma as kp

    size = backbone.image_size
    preprocessor = kp.PaliGemmaCausalLMPreprocessor(
        tokenizer=kp.PaliGemmaTokenizer(proto=vocabulary_proto),
        image_converter=kp.PaliGemmaImageConverter(image_size=(size, size)),
        sequence_length=sequence_length,
    )
    return kp.PaliGemmaCausalLM(backbone, preprocessor)
