"""The procedural data and the pixel classifier the evaluation relies on."""

from __future__ import annotations

import torch

from diffquant.tiny import shapes
from diffquant.tiny.evaluate import accuracy


def test_classifier_reads_rendered_ground_truth(rng):
    attrs = shapes.sample_attributes(300, rng)
    images = shapes.to_uint8(shapes.render(attrs, generator=rng))
    acc = accuracy(images, attrs)
    assert min(acc.values()) >= 0.99, acc


def test_attributes_cover_the_spec_and_background_differs(rng):
    attrs = shapes.sample_attributes(2000, rng)
    assert {a.shape for a in attrs} == set(shapes.SHAPES) and len(shapes.SHAPES) >= 3
    assert {a.color for a in attrs} == set(shapes.COLORS) and len(shapes.COLORS) >= 6
    assert {a.position for a in attrs} == {"center", "left", "right", "top", "bottom"}
    assert {a.size for a in attrs} == {"small", "large"}
    assert all(a.color != a.background for a in attrs)


def test_caption_from_attributes():
    a = shapes.Attributes("red", "circle", "orange", "top", "small")
    assert shapes.caption(a) == "a small red circle at the top on an orange background"
    b = shapes.Attributes("blue", "square", "white", "center", "large")
    assert shapes.caption(b) == "a large blue square in the center on a white background"


def test_classifier_on_blank_image_is_none():
    blank = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    assert shapes.classify(blank) is None
