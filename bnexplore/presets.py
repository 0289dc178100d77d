"""Named scenarios to start from: ``preset=NAME`` in a link.

A preset is a set of parameter values over the defaults, plus the story it
tells. Its claims are numbers the app measures, never numbers written here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    story: str
    values: Mapping[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "seed",
            "The question as asked",
            "An all-ones batch of shape (20, 100, 35, 45) through a fresh "
            "torch.nn.BatchNorm2d(100) and a fresh "
            "keras.layers.BatchNormalization(), every default. A new PyTorch "
            "module is in training mode, so it normalizes with the batch's own "
            "statistics (mean 1, variance 0) and returns 0; a direct Keras call "
            "is inference, so it uses its fresh moving statistics (mean 0, "
            "variance 1) and returns 1/√(1 + 1e-3).",
        ),
    )
}


def matching(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> Preset | None:
    """The preset whose scenario these values are exactly, if any."""
    for preset in PRESETS.values():
        if dict(values) == {**defaults, **preset.values}:
            return preset
    return None
