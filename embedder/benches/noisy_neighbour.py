"""Small requests' latency alone, beside a heavy client, and beside slow-loris connections.

Plain asyncio (no dependencies): each request opens its own connection, as a client behind a
load balancer often does. A request not answered within the client timeout counts as that
timeout, so a stalled server shows as a ratio, not as a missing number.
"""

import argparse
import asyncio
import json
import math
import platform
import time

CLIENT_TIMEOUT = 10.0
SLOW_LORIS = 200


async def post(port, body, timeout=CLIENT_TIMEOUT):
    """POST /api/v1/embed; returns (status, seconds)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /api/v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    try:
        async def exchange():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + payload)
            await writer.drain()
            status_line = await reader.readline()
            await reader.read()
            writer.close()
            return int(status_line.split()[1]) if status_line else 0
        status = await asyncio.wait_for(exchange(), timeout)
    except (asyncio.TimeoutError, OSError):
        status = 0
    return status, min(time.perf_counter() - started, timeout)


async def small_requests(port, n):
    """n one-text requests from two clients; their latencies and non-200 count."""
    latencies, failures = [], 0
    counter = iter(range(n))

    async def client(worker):
        nonlocal failures
        for i in counter:
            status, seconds = await post(port, {"texts": [f"small request {worker} {i}"]})
            latencies.append(seconds)
            failures += status != 200

    await asyncio.gather(client(0), client(1))
    return latencies, failures


def percentile(values, p):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def heavy_client(port, stop, counts):
    words = [f"w{(i * 7) % 997}" for i in range(220)]
    texts = [" ".join(words[i % 13:] + words[: i % 13]) for i in range(256)]
    while not stop.is_set():
        status, _ = await post(port, {"texts": texts}, timeout=120)
        counts[status] = counts.get(status, 0) + 1


async def slow_loris(port, stop, counts):
    """Keeps one connection sending headers and the start of a body, reopened if closed."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"texts\": [\""
            )
            await writer.drain()
            counts["opened"] = counts.get("opened", 0) + 1
            while not stop.is_set():
                # One byte every second: never finishing.
                await asyncio.sleep(1)
                writer.write(b"a")
                await writer.drain()
        except OSError:
            counts["closed by server"] = counts.get("closed by server", 0) + 1
            await asyncio.sleep(0.1)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    flags = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    print(f"# noisy neighbour: {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, CPU flags {' '.join(simd) or 'none of avx2/avx512'}")

    # Warm-up.
    await small_requests(args.port, 20)
    rows = []
    alone, failures = await small_requests(args.port, args.requests)
    rows.append(("alone", alone, failures, ""))

    stop, counts = asyncio.Event(), {}
    heavy = asyncio.create_task(heavy_client(args.port, stop, counts))
    await asyncio.sleep(2)
    beside, failures = await small_requests(args.port, args.requests)
    stop.set()
    await heavy
    rows.append(("one heavy client (256 texts x 220 words)", beside, failures,
                 f"heavy requests answered: {counts}"))

    stop, counts = asyncio.Event(), {}
    loris = [asyncio.create_task(slow_loris(args.port, stop, counts)) for _ in range(SLOW_LORIS)]
    await asyncio.sleep(2)
    beside, failures = await small_requests(args.port, args.requests)
    stop.set()
    await asyncio.gather(*loris, return_exceptions=True)
    rows.append((f"{SLOW_LORIS} slow-loris connections", beside, failures, f"{counts}"))

    base50, base95 = percentile(alone, 50), percentile(alone, 95)
    print("| small requests | n | P50 ms | P95 ms | P95 / alone | not 200 | notes |")
    print("|---|---|---|---|---|---|---|")
    for name, latencies, failures, notes in rows:
        p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
        print(f"| {name} | {len(latencies)} | {p50 * 1000:.1f} | {p95 * 1000:.1f} | "
              f"{p95 / base95:.2f}x | {failures} | {notes} |")
    print(f"goal: P95 beside the heavy client <= 3x alone ({3 * base95 * 1000:.1f} ms); "
          f"slow-loris connections change nothing")


if __name__ == "__main__":
    asyncio.run(main())
