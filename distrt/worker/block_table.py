"""The worker's block tables as rows of one persistent int32 array, so a step gathers its batch's
tables with one numpy index instead of padding a Python list per request.

Each RequestState takes a row when it is first prepared and gives it back when the worker drops
it; only blocks appended since the last step are written (`table_len` says how many the row has):

    rows:  0 [7, 2, 5, 0, 0 ...]   request a (3 blocks)
           1 [4, 0, 0, 0, 0 ...]   request b (1 block)          batch [b, a], 3 blocks wide:
           2 [0, 0, 0, 0, 0 ...]   free                          [[4, 0, 0], [7, 2, 5]]

A freed row is zeroed, so the padding past a request's table reads block 0, as before.
"""

from __future__ import annotations

import numpy as np

from distrt.worker.request_state import RequestState


class BlockTableRows:
    def __init__(self, width: int, rows: int = 64) -> None:
        self.table = np.zeros((max(1, rows), max(1, width)), dtype=np.int32)
        self._free = list(range(self.table.shape[0] - 1, -1, -1))  # pop() hands out row 0 first

    @property
    def num_used(self) -> int:
        return self.table.shape[0] - len(self._free)

    def sync(self, st: RequestState) -> int:
        """st's row, holding all of st.block_ids (taken now if st has none)."""
        row = st.row
        if row < 0:
            if not self._free:
                self._grow_rows()
            row = st.row = self._free.pop()
            st.table_len = 0
        n = len(st.block_ids)
        if n != st.table_len:
            if n > self.table.shape[1]:
                self._grow_width(n)
            self.table[row, st.table_len:n] = st.block_ids[st.table_len:n]
            st.table_len = n
        return row

    def release(self, st: RequestState) -> None:
        if st.row >= 0:
            self.table[st.row, : st.table_len] = 0
            self._free.append(st.row)
            st.row, st.table_len = -1, 0

    def gather(self, rows: np.ndarray, width: int) -> np.ndarray:
        return self.table[rows, :width]

    def _grow_rows(self) -> None:
        old = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def _grow_width(self, n: int) -> None:
        wide = np.zeros((self.table.shape[0], max(n, 2 * self.table.shape[1])), dtype=np.int32)
        wide[:, : self.table.shape[1]] = self.table
        self.table = wide
