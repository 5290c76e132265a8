"""``captioner bench-serve``: start the server in a subprocess on a loopback port, send it
a bounded load from this process (N concurrent clients, a fixed number of requests, one
image each) and report requests/s and p50/p99 latency, with and without batching.

Only loopback addresses are ever used; every run is bounded in requests and time.

Example:
    >>> rows = bench_serve(["--run", "runs/demo"], [Path("a.png")])   # doctest: +SKIP
    >>> [(r["mode"], r["clients"], round(r["requests_per_s"])) for r in rows]  # doctest: +SKIP
    [('batched', 1, 30), ('batched', 8, 110), ...]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np


@dataclass(frozen=True)
class LoadSpec:
    """One load: ``clients`` concurrent clients send ``requests`` requests in all.

    Example:
        >>> LoadSpec(8, 64).requests
        64
    """

    clients: int
    requests: int
    timeout_s: float = 120.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source_args: Sequence[str], port: int, max_batch: int,
                 timeout_s: float = 180.0) -> subprocess.Popen:
    """``captioner serve`` in a subprocess on 127.0.0.1:``port``; returns once
    ``/health`` answers (or raises RuntimeError with the server's output)."""
    cmd = [sys.executable, "-m", "captioner", "serve", *source_args, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server did not answer /health within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _load(url: str, images: list[bytes], spec: LoadSpec) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=spec.clients, max_keepalive_connections=spec.clients)
    async with httpx.AsyncClient(timeout=spec.timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued, errors
            while issued < spec.requests:
                data = images[issued % len(images)]
                issued += 1
                start = time.perf_counter()
                r = await client.post(url, files={"image": ("image.png", data, "image/png")})
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(spec.clients))),
                               spec.timeout_s)
        seconds = time.perf_counter() - began
    ms = np.array(latencies) * 1000.0
    return {"clients": spec.clients, "requests": len(latencies), "errors": errors,
            "seconds": round(seconds, 3), "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def run_load(base_url: str, images: list[bytes], spec: LoadSpec) -> dict[str, Any]:
    """Send ``spec``'s load to ``base_url``/v1/caption; returns its figures."""
    return asyncio.run(_load(f"{base_url}/v1/caption", images, spec))


def bench_serve(source_args: Sequence[str], images: Sequence[Path],
                clients: Sequence[int] = (1, 8, 32), requests: int = 128,
                max_batch: int = 32, warmup: int = 8) -> list[dict[str, Any]]:
    """For batching on (``max_batch``) and off (1): start a server, warm it up, then run
    each client count; one row of figures per (mode, clients)."""
    data = [Path(p).read_bytes() for p in images]
    rows = []
    for mode, batch in (("batched", max_batch), ("one_at_a_time", 1)):
        port = free_port()
        proc = start_server(source_args, port, batch)
        try:
            base = f"http://127.0.0.1:{port}"
            run_load(base, data, LoadSpec(min(4, max(clients)), warmup))
            for n in clients:
                rows.append({"mode": mode, "max_batch": batch,
                             **run_load(base, data, LoadSpec(n, requests))})
            health = httpx.get(f"{base}/health", timeout=5.0).json()
            rows[-1]["batches_seen"] = health.get("batches", {})
        finally:
            stop_server(proc)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table.

    Example:
        >>> print(markdown_table([{"mode": "batched", "clients": 1, "requests": 8,
        ...   "requests_per_s": 20.0, "p50_ms": 40.0, "p99_ms": 60.0, "errors": 0}]))
        | mode | clients | requests | requests/s | p50 ms | p99 ms | errors |
        |---|---:|---:|---:|---:|---:|---:|
        | batched | 1 | 8 | 20.0 | 40.0 | 60.0 | 0 |
    """
    lines = ["| mode | clients | requests | requests/s | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | "
                     f"{r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    return "\n".join(lines)
