"""Micro-batching: images of requests that arrive together are decoded in one compiled
call, on a worker thread, so the event loop never waits for TensorFlow."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BatchingOptions:
    """How requests are grouped: the first waiting image opens a window of
    ``window_ms``; the batch closes when the window ends or ``max_batch`` images wait.
    ``max_batch=1`` decodes one image at a time (no batching).

    Example:
        >>> BatchingOptions(max_batch=1).enabled
        False
    """

    max_batch: int = 32
    window_ms: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


@dataclass
class _Job:
    pixels: np.ndarray  # (S, S, 3) uint8
    future: asyncio.Future


class MicroBatcher:
    """Collects images from concurrent requests and runs ``decode`` on batches of them.

    ``decode(pixels (B, S, S, 3)) -> B results`` runs on one worker thread (one compiled
    call at a time; TensorFlow uses the cores inside it). Each caller awaits its own
    results; a failing batch fails exactly the callers in it.

    Example:
        >>> async def demo():
        ...     batcher = MicroBatcher(lambda px: [int(p.sum()) for p in px])
        ...     batcher.start()
        ...     out = await asyncio.gather(*(batcher.submit([np.full((1, 1, 3), i, np.uint8)])
        ...                                  for i in range(3)))
        ...     await batcher.stop()
        ...     return out, batcher.batch_sizes
        >>> asyncio.run(demo())
        ([[0], [3], [6]], Counter({3: 1}))
    """

    def __init__(self, decode: Callable[[np.ndarray], list[Any]],
                 options: BatchingOptions | None = None):
        self.decode = decode
        self.options = options or BatchingOptions()
        self.batch_sizes: Counter[int] = Counter()  # batch size -> batches run
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="captioner-decode")

    def start(self) -> None:
        """Start the collecting task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=False)

    async def submit(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Decode ``images`` (each (S, S, 3) uint8) -> their results, in order."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        jobs = [_Job(np.asarray(im, np.uint8), loop.create_future()) for im in images]
        for job in jobs:
            self._queue.put_nowait(job)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _collect(self) -> list[_Job]:
        """Wait for one job, then gather more until the window closes or the batch fills."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.window_ms / 1000.0
        while len(batch) < self.options.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        while len(batch) < self.options.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())  # arrived while the last batch ran
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            pixels = np.stack([job.pixels for job in batch])  # (B, S, S, 3)
            self.batch_sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self._pool, self.decode, pixels)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
