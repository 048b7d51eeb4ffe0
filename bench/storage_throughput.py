"""Upload/download throughput of the artifact store: a local folder and S3 over HTTP.

The S3 side is moto's server started here in its own process on 127.0.0.1 (a real HTTP
endpoint, like the tests use), so the figures measure our client path (hashing, multipart
transfer, verification, atomic rename) plus moto, not AWS. Each put uses fresh random content
(identical content would be a no-op) and each get downloads to a fresh file.

    .venv/bin/python bench/storage_throughput.py --size-mb 1 16 64 --repeat 3 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

from eqdiff.store import ArtifactStore, open_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """Run ``moto.server`` in a child process; yield its endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_store(backend: str, store: ArtifactStore, sizes_mb: list[int], repeat: int,
                scratch: Path) -> list[dict[str, object]]:
    """Median put_file / get_file times per size for one store."""
    results = []
    for size_mb in sizes_mb:
        put_s, get_s = [], []
        for i in range(repeat):
            source = scratch / f"src-{size_mb}-{i}.bin"
            source.write_bytes(os.urandom(size_mb * 1024 * 1024))
            key = f"bench/{size_mb}mb/{i}.bin"
            put_s.append(_timed(lambda k=key, s=source: store.put_file(k, s)))
            dest = scratch / f"dst-{size_mb}-{i}.bin"
            get_s.append(_timed(lambda k=key, d=dest: store.get_file(k, d)))
            source.unlink()
            dest.unlink()
        for op, times in (("put", put_s), ("get", get_s)):
            median = statistics.median(times)
            results.append({"backend": backend, "size_mb": size_mb, "op": op,
                            "median_s": round(median, 4), "mb_per_s": round(size_mb / median, 1),
                            "times_s": [round(t, 4) for t in times]})
    store.delete_prefix("bench")
    return results


def _write_table(results: list[dict[str, object]]) -> None:
    lines = [f"{'backend':8} {'size MB':>8} {'op':4} {'median s':>9} {'MB/s':>8}"]
    lines += [f"{r['backend']:8} {r['size_mb']:>8} {r['op']:4} {r['median_s']:>9.3f} "
              f"{r['mb_per_s']:>8.1f}" for r in results]
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, nargs="+", default=[1, 16, 64],
                        help="object sizes in MB (default: 1 16 64)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median reported)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for storage_throughput.json")
    args = parser.parse_args(argv)

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)  # moto accepts any credentials
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        scratch = Path(tmp)
        local = open_store(str(scratch / "artifacts"))
        results += bench_store("local", local, args.size_mb, args.repeat, scratch)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3 = open_store("s3://bench/eqdiff", endpoint_url=endpoint,
                        cache_dir=str(scratch / "s3-cache"))
        results += bench_store("s3-moto", s3, args.size_mb, args.repeat, scratch)

    _write_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "repeat": args.repeat, "results": results}
    path = args.out / "storage_throughput.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(f"results written to {path}\n")


if __name__ == "__main__":
    main()
