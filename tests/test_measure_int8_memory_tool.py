"""`tools/measure_int8_memory.py` reuses kept presets only when they were
built for the same architecture."""

import importlib.util
import json
import os

import pytest

from conftest import REPO

SHAPES = os.path.join(REPO, "presets", "pali_gemma_shapes")


def load_tool():
    path = os.path.join(REPO, "tools", "measure_int8_memory.py")
    spec = importlib.util.spec_from_file_location("measure_int8_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_records_what_it_built_and_other_runs_are_refused(tmp_path):
    tool = load_tool()
    tool.build(SHAPES, 1, str(tmp_path))
    assert tool.built_for(str(tmp_path)) == {"preset": SHAPES, "layers": 1}
    for name in ("float32", "int8"):
        with open(tmp_path / name / "config.json") as f:
            assert json.load(f)["config"]["num_layers"] == 1

    with pytest.raises(SystemExit):  # other layers: not these presets
        tool.main(["--preset", SHAPES, "--layers", "2",
                   "--workdir", str(tmp_path), "--keep"])
    assert tool.built_for(str(tmp_path)) == {"preset": SHAPES, "layers": 1}


def test_a_non_empty_workdir_without_presets_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        load_tool().main(["--preset", SHAPES, "--workdir", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine"
