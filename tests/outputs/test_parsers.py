import warnings

import numpy as np
import pytest
from keras import ops

from keras_paligemma import MaskDecoder
from keras_paligemma import parse_detections
from keras_paligemma import parse_segmentations
from keras_paligemma.outputs.segmentation import paste_mask
from outputs import encoding
from outputs import vae_reference

SIZE = (480, 640)  # height, width: not square, so axes must not be mixed up
OBJECTS = [
    ("cat", (32.0, 48.0, 320.0, 400.0)),
    ("big dog", (300.5, 10.0, 639.0, 470.0)),
]


def test_detections_round_trip_to_one_location_bin():
    text = encoding.detection_answer(OBJECTS, SIZE)
    parsed = parse_detections("detect cat ; big dog\n" + text, SIZE)
    assert [d.label for d in parsed] == ["cat", "big dog"]
    for detection, (_, box) in zip(parsed, OBJECTS):
        tolerance = np.array([SIZE[1], SIZE[0], SIZE[1], SIZE[0]]) / 1024
        assert (np.abs(np.array(detection.box) - box) <= tolerance).all()


def test_segmentations_round_trip_boxes_and_codes():
    codes = [tuple(range(16)), tuple(range(100, 116))]
    objects = [(label, box, c) for (label, box), c in zip(OBJECTS, codes)]
    parsed = parse_segmentations(encoding.segmentation_answer(objects, SIZE), SIZE)
    assert [s.label for s in parsed] == ["cat", "big dog"]
    assert [s.codes for s in parsed] == codes
    assert all(s.mask is None for s in parsed)
    tolerance = np.array([SIZE[1], SIZE[0], SIZE[1], SIZE[0]]) / 1024
    for seg, (_, box) in zip(parsed, OBJECTS):
        assert (np.abs(np.array(seg.box) - box) <= tolerance).all()


def test_segmentation_masks_come_from_the_decoder_inside_the_box():
    arrays = vae_reference.random_checkpoint(embedding_dim=8, seed=3)
    decoder = MaskDecoder.from_vae_checkpoint(arrays)
    codes = tuple(np.random.default_rng(0).integers(0, 128, 16).tolist())
    objects = [("cat", OBJECTS[0][1], codes)]
    (parsed,) = parse_segmentations(
        encoding.segmentation_answer(objects, SIZE), SIZE, decoder=decoder
    )
    assert parsed.mask.shape == SIZE and parsed.mask.dtype == bool
    expected = paste_mask(vae_reference.decode(codes, arrays), parsed.box, SIZE)
    assert (parsed.mask != expected).mean() < 1e-3
    x_min, y_min, x_max, y_max = (int(round(v)) for v in parsed.box)
    outside = parsed.mask.copy()
    outside[y_min:y_max, x_min:x_max] = False
    assert not outside.any()
    assert parsed.mask[y_min:y_max, x_min:x_max].any()


@pytest.mark.parametrize(
    "text",
    [
        "<loc0100><loc0200><loc0300> cat",  # truncated: 3 locations
        "<loc0300><loc0200><loc0100><loc0400> cat",  # inverted box
        "just words",
        "",
        "<loc0100><loc0200><loc0300><loc0400> cat ; <loc01",
    ],
)
def test_malformed_output_is_skipped_with_a_warning(text):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detections = parse_detections(text, SIZE)
        segmentations = parse_segmentations(text, SIZE)
    assert segmentations == []
    if text.startswith("<loc0100><loc0200><loc0300><loc0400>"):
        assert [d.label for d in detections] == ["cat"]
    else:
        assert detections == []
    if text.strip():
        assert caught, "malformed output should warn"


def test_image_size_must_be_height_width():
    with pytest.raises(TypeError, match="image_size"):
        parse_detections("", "big")
    with pytest.raises(ValueError, match="image_size"):
        parse_detections("", (0, 10))

