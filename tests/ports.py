"""Free TCP ports for the servers the tests start (Ray heads, moto S3, the flaky S3 proxy), and the
command that starts moto's S3 server."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

#: Ports handed out by this process, so two servers of one test never get the same one.
_ISSUED: set[int] = set()
#: Lowest port the tests use (Ray's workers take 10002-19999 by default); the top is just below
#: the kernel's ephemeral range.
_LOWEST = 20_000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port() -> int:
    """A TCP port free on every interface a moment ago, below the ephemeral range.

    A port the kernel picks (``bind(("", 0))``) lies in the ephemeral range, which every process
    draws from for its outgoing connections. Between picking it and the server binding it, one of
    Ray's own connections can take it: the head's dashboard agent then fails to bind (it binds the
    node's IP, not 127.0.0.1) and ``ray job submit`` answers "No available agent" for good.
    Ports below the range are only ever taken by servers that ask for them.
    """
    low, high = ephemeral_range()
    # below the range; above it only where the kernel's range starts too low to leave room
    candidates = range(_LOWEST, low) if low > _LOWEST + 1_000 else range(high + 1, 65_536)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.choice(candidates)
        if port in _ISSUED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all interfaces, no SO_REUSEADDR: TIME_WAIT counts as taken
            except OSError:
                continue
        _ISSUED.add(port)
        return port
    raise RuntimeError(f"no free TCP port found in {candidates}")


def moto_server_command(port: int) -> list[str]:
    """moto's S3 server on 127.0.0.1:``port``, from this interpreter's environment.

    Not the first ``moto_server`` on PATH: with the virtual environment not activated that can be
    another Python's moto (on the development machine pyenv's moto 5.2.1, whose answer to
    CompleteMultipartUpload pyarrow reads as an error, getmoto/moto#10055: every S3 Parquet write
    failed; the test extra excludes that version).
    """
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
