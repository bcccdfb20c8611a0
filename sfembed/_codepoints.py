"""A class per BMP code point, filled in as texts bring new points.

The token estimator and the local server's own tokenizer each classify characters by their own
rules; both keep the classes of the points met so far in a table like this one. Filling a whole
table up front took 30-50 ms of a job's start (27 ms of a local server's), before the first
request, and a corpus meets a few thousand points."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__all__ = ["CodePointTable"]

#: A classifier of BMP code points (an array of at least one), in bulk.
Classifier = Callable[[npt.NDArray[np.intp]], npt.NDArray[np.uint8]]


class CodePointTable:
    """The class of each BMP code point, by ``classified``, each point classified once, when a
    text first brings it. Threads may fill the table at once: they write the same values."""

    UNKNOWN = 255  # a class no classifier gives: the point is not met yet

    def __init__(self, classified: Classifier) -> None:
        self.table = np.full(0x10000, self.UNKNOWN, dtype=np.uint8)
        self._classified = classified

    def __call__(self, codes: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint8]:
        """The class of each of ``codes`` (BMP code points), classifying those not met before."""
        table = self.table
        classes = table[codes]
        unknown = classes == self.UNKNOWN
        if unknown.any():
            met = np.zeros(0x10000, dtype=np.bool_)  # not np.unique: it imports numpy.ma (20 ms)
            met[codes[unknown]] = True
            new = np.flatnonzero(met)
            table[new] = self._classified(new)
            classes[unknown] = table[codes[unknown]]
        return classes
