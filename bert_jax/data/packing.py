"""Packing several instances into each row, for long sequences where many instances are short
(docs/data.md: what a packed row holds and how the model keeps its instances apart).

Rows are filled by best-fit decreasing: instances longest first, each into the open row it
fills most tightly; deterministic, and most rows come out full. Rows are returned in the
order of their first instance, so a split keeps its stored order (evaluation reads it).
"""

from __future__ import annotations

import numpy as np


def pack(lengths: np.ndarray, capacity: int, max_per_row: int) -> list[list[int]]:
    """Rows of instance indices: each row's lengths sum to at most `capacity`, with at most
    `max_per_row` instances; every instance in exactly one row."""
    lengths = np.asarray(lengths, int)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"instance lengths {lengths.min()}..{lengths.max()}: expected 1.."
                         f"{capacity}")
    rows: list[list[int]] = []
    open_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # by room left
    has_room = np.zeros(capacity + 1, bool)  # has_room[r]: some open row has r left
    for index in np.argsort(-lengths, kind="stable"):
        length = int(lengths[index])
        fitting = np.flatnonzero(has_room[length:])
        if len(fitting):  # the tightest open row it fits
            room = length + int(fitting[0])
            row = open_rows[room].pop()
            has_room[room] = bool(open_rows[room])
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(int(index))
        room -= length
        if room > 0 and len(rows[row]) < max_per_row:
            open_rows[room].append(row)
            has_room[room] = True
    return sorted(rows, key=min)
