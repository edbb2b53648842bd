"""tests/ports.py: ports for test servers lie below the ephemeral range and are never reissued."""

from __future__ import annotations

import socket

from tests import ports
from tests.ports import ephemeral_range, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    assert 0 < low <= high <= 65_535
    picked = [free_port() for _ in range(50)]
    assert len(set(picked)) == len(picked)
    if low > 21_000:  # Linux default 32768: outgoing connections never take these ports
        assert all(20_000 <= p < low for p in picked)
    for port in picked[:5]:
        with socket.socket() as s:
            s.bind(("", port))  # free on every interface, as Ray's agents need


def test_a_port_held_by_a_server_or_issued_before_is_skipped(monkeypatch) -> None:
    issued = free_port()
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]  # held by a server, never issued by free_port

        class Draws:  # the candidates free_port draws: the two bad ones first
            def __init__(self) -> None:
                self.seq = iter([taken, issued, taken, 30_000, 30_001, 30_002])

            def choice(self, candidates: range) -> int:
                return next(self.seq)

        monkeypatch.setattr(ports.random, "SystemRandom", Draws)
        got = free_port()
    assert got not in (taken, issued) and got in (30_000, 30_001, 30_002)
