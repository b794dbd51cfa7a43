"""How `PaliGemmaCausalLM.generate` is compiled: prompt buckets, JAX jit.

Each `generate` call prefills only `prompt_bucket(longest prompt)` text
columns. The bucket is a static (Python int) argument, so one function is
compiled per bucket and new prompt lengths inside it reuse it.
"""

import functools
import itertools

import keras
from keras import ops

PROMPT_BUCKET_MIN = 32


def prompt_bucket(prompt_length, max_length):
    """The prefill width for a longest prompt of `prompt_length` tokens.

    The next power of two, at least `PROMPT_BUCKET_MIN`, at most
    `max_length`: prompts of 1-32 tokens (nearly every PaliGemma task
    prompt) share a compiled function, then 33-64, 65-128, ...

    >>> prompt_bucket(12, 64), prompt_bucket(33, 128), prompt_bucket(40, 48)
    (32, 64, 48)
    """
    bucket = max(PROMPT_BUCKET_MIN, 1 << max(prompt_length - 1, 0).bit_length())
    return min(bucket, max_length)


def jax_generate_function(causal_lm):
    """`causal_lm.generate_step` under `jax.jit`, `prefill_length` static.

    As keras-hub's own JAX path: the variables go in as arguments
    (never baked in as constants) and the sampler's seeds come back.
    """
    import jax

    @functools.partial(
        jax.jit, static_argnames=("stop_token_ids", "prefill_length")
    )
    def compiled(inputs, stop_token_ids, prefill_length, state):
        sampler_state, trainable, non_trainable = state
        mapping = itertools.chain(
            zip(causal_lm.sampler.variables, sampler_state),
            zip(causal_lm.trainable_variables, trainable),
            zip(causal_lm.non_trainable_variables, non_trainable),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = causal_lm.generate_step(
                {**inputs, "prefill_length": prefill_length},
                stop_token_ids,
            )
        updated = [
            scope.get_current_value(v) for v in causal_lm.sampler.variables
        ]
        sampler_state = [
            old if new is None else new
            for new, old in zip(updated, sampler_state)
        ]
        return outputs, sampler_state

    def run(inputs, stop_token_ids=None):
        inputs = dict(inputs)
        prefill_length = inputs.pop("prefill_length")
        inputs = {k: ops.convert_to_tensor(v) for k, v in inputs.items()}
        state = (
            [v.value for v in causal_lm.sampler.variables],
            [v.value for v in causal_lm.trainable_variables],
            [v.value for v in causal_lm.non_trainable_variables],
        )
        if stop_token_ids is not None:
            stop_token_ids = tuple(stop_token_ids)
        outputs, sampler_state = compiled(
            inputs, stop_token_ids, prefill_length, state
        )
        for variable, value in zip(causal_lm.sampler.variables, sampler_state):
            variable.assign(value)
        return outputs

    return run
