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
import tempfile
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
    ``/health`` answers (or raises RuntimeError with the server's output). Its output
    goes to a temporary file (a pipe nobody reads would fill up and stall the server)."""
    cmd = [sys.executable, "-m", "captioner", "serve", *source_args, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    proc.log = log  # type: ignore[attr-defined]  # closed with the process
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-4000:]}")
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
    log = getattr(proc, "log", None)
    if log is not None:
        log.close()


def multipart_request(port: int, data: bytes, name: str = "image.png") -> bytes:
    r"""A complete keep-alive ``POST /v1/caption`` (multipart, field ``image``) as bytes.

    Example:
        >>> multipart_request(8000, b"PNG").split(b"\r\n")[0]
        b'POST /v1/caption HTTP/1.1'
    """
    boundary = "captioner-load-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + (
            f"\r\n--{boundary}--\r\n").encode()
    head = (f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> int:
    """Send one pre-encoded request, read the whole response; returns its status."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _load(port: int, images: list[bytes], spec: LoadSpec) -> dict[str, Any]:
    """Each client is one keep-alive connection sending pre-encoded requests (a raw
    asyncio client, like wrk: the load generator's own CPU stays small beside the
    server's on a shared machine)."""
    requests = [multipart_request(port, data) for data in images]
    latencies: list[float] = []
    errors = 0
    issued = 0

    async def client() -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while issued < spec.requests:
                request = requests[issued % len(requests)]
                issued += 1
                start = time.perf_counter()
                status = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - start)
                errors += status != 200
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(spec.clients))),
                           spec.timeout_s)
    seconds = time.perf_counter() - began
    ms = np.array(latencies) * 1000.0
    return {"clients": spec.clients, "requests": len(latencies), "errors": errors,
            "seconds": round(seconds, 3), "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def run_load(port: int, images: list[bytes], spec: LoadSpec) -> dict[str, Any]:
    """Send ``spec``'s load to ``POST /v1/caption`` on 127.0.0.1:``port``; returns its
    figures."""
    return asyncio.run(_load(port, images, spec))


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
            run_load(port, data, LoadSpec(min(4, max(clients)), warmup))
            for n in clients:
                rows.append({"mode": mode, "max_batch": batch,
                             **run_load(port, data, LoadSpec(n, requests))})
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5.0).json()
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
