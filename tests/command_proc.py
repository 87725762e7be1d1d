"""A `ControllerProcess` started with a command line of the test's choosing (global flags, an
installed ``floorhand`` script) in a working directory of its choosing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from tests.controller_proc import ROOT, ControllerProcess


class CommandController(ControllerProcess):
    """Runs ``[*command, "run", SITE]`` in ``cwd`` (default: the checkout); ``drop_env`` names
    variables of our environment the child must not see (PYTHONPATH for an installed one)."""

    def __init__(
        self,
        site: Path,
        folder: Path,
        command: Sequence[str],
        *,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        drop_env: Sequence[str] = (),
    ) -> None:
        super().__init__(site, folder, env=env)
        self.command = list(command)
        self.cwd = cwd
        self.drop_env = tuple(drop_env)

    def child_env(self) -> dict[str, str]:
        env = super().child_env()
        for name in self.drop_env:
            env.pop(name, None)
        return env

    async def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            "run",
            str(self.site),
            stdout=log,
            stderr=log,
            env=self.child_env(),
            cwd=str(self.cwd),
        )
        log.close()
        self.starts += 1
