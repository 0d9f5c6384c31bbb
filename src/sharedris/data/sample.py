"""The sample every data source returns, and the protocol of a source.

A *source* is indexable; item ``i`` is a :class:`RefSample` (a dict, so sources add their own
keys: refer samples carry ``ref_id``/``sent_id``/``image_id``, synthetic scenes their objects).
A training source may also have ``set_epoch(epoch)``, which the training loop calls before each
epoch, and ``groups``: the breakdown keys (values of ``group``) that evaluation reports separately.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

import numpy as np
from PIL import Image


class RefSample(TypedDict):
    """One (image, expression, target) triple.

    image: PIL RGB image at its stored size.
    mask: bool (H, W) at the image's size: the union of the referred objects; all False when the
        expression refers to nothing in the image.
    text: the expression.
    ann_ids: the annotation (or object) ids the mask was made from; empty when nothing is referred to.
    group: a breakdown key for evaluation (e.g. the synthetic expression family); "" when none.
    """

    image: Image.Image
    mask: np.ndarray
    text: str
    ann_ids: list[int]
    group: str


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RefSample: ...
