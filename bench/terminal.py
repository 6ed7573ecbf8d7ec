"""A real 80x24 terminal for ``ckpt browse``: a private tmux server, keys sent, the pane read back.

Shared by ``bench/bench_browse.py`` (time until the tree is on the screen) and
``tests/test_browse_tmux.py`` (the app in a real terminal, and the terminal restored after it).
"""

from __future__ import annotations

import os
import subprocess
import time


class Tmux:
    """One private tmux server (its own socket) running a shell in an 80x24 window."""

    def __init__(self, cwd: str | None = None, poll: float = 0.01) -> None:
        self.socket = f"ckpt-browse-{os.getpid()}"
        self.poll = poll
        env = {**os.environ, "TERM": "xterm-256color", "PS1": "$ "}
        env.pop("NO_COLOR", None)  # the browser as a user sees it, in colour
        where = ["-c", cwd] if cwd else []
        subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", *where]
            + ["bash --norc --noprofile"],
            check=True,
            env=env,
        )

    def send(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(["tmux", "-L", self.socket, "send-keys", *(["-l"] if literal else []), *keys], check=True)

    def pane(self) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "capture-pane", "-p"], check=True, capture_output=True, text=True
        ).stdout

    def wait_for(self, *texts: str, timeout: float = 60.0) -> str:
        """The screen, as soon as it shows every one of ``texts``."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.pane()
            if all(t in screen for t in texts):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {texts!r} on the screen:\n{screen}")
            time.sleep(self.poll)

    def wait_gone(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text in self.pane():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} stays on the screen:\n{self.pane()}")
            time.sleep(self.poll)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], check=False, capture_output=True)
