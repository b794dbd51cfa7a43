"""Guard for `save_to_preset`: never overwrite a preset the user saved."""

import os


def check_preset_dir(preset_dir, overwrite):
    """Raise unless `preset_dir` is missing, empty, or `overwrite` is True.

    keras-hub's saver writes into an existing directory, replacing files
    and leaving stale ones beside them; our `save_to_preset` calls this
    first so a saved preset is only replaced on request.
    """
    if overwrite or not os.path.exists(preset_dir):
        return
    if not os.path.isdir(preset_dir):
        raise FileExistsError(
            f"`preset_dir` {preset_dir!r} exists and is not a directory."
        )
    if os.listdir(preset_dir):
        raise FileExistsError(
            f"`preset_dir` {preset_dir!r} is not empty; pass "
            "`overwrite=True` to replace the preset saved there."
        )
