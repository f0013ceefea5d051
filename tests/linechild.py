"""A helper Python process spoken to one line at a time: the crash harness's forker and the
compatibility test's command runner fork their CLI runs from one (heavy libraries imported once).
It imports nothing of kedit, so a test that must reach kedit only through its command line can use it."""

from __future__ import annotations

import selectors
import subprocess
import sys
import textwrap


class LineChild:
    """A helper Python process that takes one request a line on stdin and answers one line a message."""

    def __init__(self, script: str, env: dict[str, str], name: str, ready_timeout: float) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        assert self.readline(ready_timeout) == "READY"

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def readline(self, timeout: float) -> str:
        if not self.selector.select(timeout):
            raise AssertionError(f"the {self.name} said nothing for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the {self.name} died: {self.proc.stderr.read()}")
        return line.strip()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
