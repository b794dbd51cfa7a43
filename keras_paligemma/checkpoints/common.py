"""What every checkpoint converter shares: checked assignment, task assembly."""


def assign_weights(backbone, assignments):
    """Assign converted arrays to the backbone's variables, checking all.

    Args:
        backbone: the `PaliGemmaBackbone` to fill.
        assignments: iterable of `(our variable path, array, source name)`.

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
        if tuple(variable.shape) != tuple(array.shape):
            raise ValueError(
                f"Shape mismatch for `{path}` (from `{source}`): the model "
                f"expects {tuple(variable.shape)}, the checkpoint has "
                f"{tuple(array.shape)}."
            )
        variable.assign(array)
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
