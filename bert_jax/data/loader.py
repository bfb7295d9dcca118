"""Deterministic, host-sharded batches: the examples of global step k depend on (seed, k) only.

Global step k takes positions [k*B, (k+1)*B) of the concatenated seeded per-epoch
permutations; a process reads only its rows (`sharding.process_rows`) and masks each by its
stream position. So the loader's whole state is the step, and a run resumed on another
number of processes sees the same global batches.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator

import numpy as np

from bert_jax.data.masking import MaskingOptions, mask_batch

ORDER_STREAM = 0  # the masks draw from stream 1 (masking.MASK_STREAM)
_DONE = object()  # what ends a prefetched stream


class Loader:
    """Masked batches of one split, for one process, by step.

    `source` gives random access to the stored examples (`len`, `__getitems__` or
    `__getitem__`); `seed` keys the epoch permutations and the masks; `rows` are the rows of
    each global batch this process reads (default: all); `shuffle=False` reads the split in
    stored order (evaluation); `instances_per_row` is K of a packed split (1: unpacked)."""

    def __init__(self, source, masking: MaskingOptions, *, global_batch_size: int, seed: int,
                 max_seq_length: int, rows: slice | None = None, shuffle: bool = True,
                 instances_per_row: int = 1):
        rows = rows or slice(0, global_batch_size)
        if not 0 <= rows.start < rows.stop <= global_batch_size or rows.step not in (None, 1):
            raise ValueError(f"rows {rows.start}:{rows.stop}: expected a contiguous range of "
                             f"the {global_batch_size} rows of a global batch")
        if len(source) == 0:
            raise ValueError("the dataset split has no examples: expected a non-empty split")
        self.source = source
        self.masking = masking
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.max_seq_length = max_seq_length
        self.rows = rows
        self.shuffle = shuffle
        self.instances_per_row = instances_per_row
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        return len(self.source) / self.global_batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.source))
        if epoch not in self._permutations:
            if len(self._permutations) > 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng(
                [self.seed, ORDER_STREAM, epoch]).permutation(len(self.source))
        return self._permutations[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of global step `step`, all processes' rows."""
        positions = step * self.global_batch_size + np.arange(self.global_batch_size)
        epochs, offsets = np.divmod(positions, len(self.source))
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            indices[in_epoch] = self._epoch_order(int(epoch))[offsets[in_epoch]]
        return indices

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global step `step`, masked, as fixed-shape numpy arrays."""
        indices = [int(i) for i in self.global_indices(step)[self.rows]]
        read_many = getattr(self.source, "__getitems__", None)  # TFDS's batched random access
        examples = list(read_many(indices)) if read_many else [self.source[i] for i in indices]
        first_position = step * self.global_batch_size + self.rows.start
        return mask_batch(examples, self.masking, self.max_seq_length, self.seed, first_position,
                          self.instances_per_row)

    def iterate(self, start_step: int = 0, num_steps: int | None = None,
                prefetch: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields (step, batch) from `start_step`, preparing the next batches on a thread."""
        steps = (range(start_step, start_step + num_steps) if num_steps is not None
                 else itertools.count(start_step))
        return _prefetched(((step, self.batch(step)) for step in steps), prefetch)


def _prefetched(items: Iterator, size: int) -> Iterator:
    """Runs `items` on a daemon thread, `size` ahead; exceptions reach the consumer."""
    if size <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(value) -> bool:  # False once the consumer has stopped: never blocks for good
        while not stop.is_set():
            try:
                buffer.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    thread = threading.Thread(target=produce, daemon=True, name="bert-jax-prefetch")
    thread.start()
    try:
        while (item := buffer.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
