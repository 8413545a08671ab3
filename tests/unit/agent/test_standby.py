"""Spare channel bookkeeping of `offload.agent.standby` (the wire behaviour is tested over real
SSH in tests/integration/ports/test_over_ssh.py)."""

from __future__ import annotations

from typing import Any

from offload.agent.standby import STANDBY_HEADER, StandbyChannels


class Channel:
    """What the pool uses of an asyncssh channel."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


class Opener:
    def __init__(self) -> None:
        self.sessions: list[Any] = []
        self.fail = False

    async def __call__(self, session_factory: Any) -> Channel:
        if self.fail:
            raise ConnectionError("tunnel down")
        chan = Channel()
        session = session_factory()
        session.connection_made(chan)
        self.sessions.append(session)
        return chan


class Session:
    def __init__(self) -> None:
        self.chan: Any = None
        self.started = False
        self.data = b""

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def session_started(self) -> None:
        self.started = True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.data += data


async def settle(pool: StandbyChannels) -> None:
    """Wait for the background fill that `take` or `fill` started."""
    assert pool._filling is not None
    await pool._filling


async def test_take_uses_a_spare_and_names_the_port_first() -> None:
    opener = Opener()
    pool = StandbyChannels(opener, spares=2)
    assert pool.take(8080, Session) is None  # nothing open yet: the caller goes the long way
    await settle(pool)
    assert pool.ready == 2

    session = Session()
    chan = pool.take(8080, lambda: session)
    assert chan is not None and session.chan is chan and session.started
    assert chan.written == STANDBY_HEADER.pack(8080)
    opener.sessions[-1].data_received(b"answer", None)  # the spare passes data to its taker
    assert session.data == b"answer"
    await settle(pool)
    assert pool.ready == 2  # refilled


async def test_a_spare_that_closes_unused_is_never_handed_out() -> None:
    opener = Opener()
    pool = StandbyChannels(opener, spares=1)
    pool.fill()
    await settle(pool)
    opener.sessions[0].connection_lost(None)  # the tunnel dropped
    assert pool.ready == 0
    opener.fail = True
    assert pool.take(80, Session) is None
    await settle(pool)  # the refill fails quietly: the next take tries again
    assert pool.ready == 0
    opener.fail = False
    pool.fill()
    await settle(pool)
    assert pool.ready == 1


async def test_close_closes_the_spares() -> None:
    opener = Opener()
    pool = StandbyChannels(opener, spares=2)
    pool.fill()
    await settle(pool)
    spares = [s.chan for s in opener.sessions]
    pool.close()
    assert all(chan.closed for chan in spares) and pool.ready == 0
