"""A controller-side process for watchdog tests: connects to a conveyor PLC, starts the belt,
prints ``RUNNING`` and keeps the heartbeat going until it is killed.

    python -m tests.modbus_client_proc PORT
"""

from __future__ import annotations

import asyncio
import sys

from devices.conveyor import ConveyorDriver
from devices.link.modbus import ModbusLink, ModbusLinkConfig


async def main(port: int) -> None:
    link = ModbusLink(ModbusLinkConfig(port=port), name="client-proc")
    conveyor = ConveyorDriver(link)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.run(), name="client-proc.link")
        await link.wait_up(5.0)
        await conveyor.start()
        print("RUNNING", flush=True)
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
