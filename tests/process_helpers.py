"""Process helpers for tests that start Ray heads or drivers in process sessions of their own: free ports, the live
members of a session, and ending a session by process id (never `ray stop`, which would end anyone's Ray)."""

from __future__ import annotations

import os
import signal
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> dict[int, str]:
    """{pid: command} of the live processes of session `sid` (zombies wait for their parent and do not count)."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command: state, ppid, pgrp, session
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members[int(entry)] = command
    return members


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_session(sid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, to the processes of session `sid`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = session_members(sid)
        signal_all(pids, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = session_members(sid)
        if not pids:
            return
