"""The API's listening socket (controller/__main__.py `_bind_api`)."""

from __future__ import annotations

import asyncio
import socket

from controller.__main__ import _bind_api


async def test_api_connections_send_without_waiting_for_the_clients_ack() -> None:
    """Accepted connections have TCP_NODELAY. uvicorn writes a response's headers and body
    in two writes; with Nagle's algorithm on, the body of every response after the first on
    a keep-alive connection waited for the client's delayed ACK (40 ms on Linux). asyncio
    sets TCP_NODELAY itself only on sockets created with proto IPPROTO_TCP, which
    `socket.create_server` does not do."""
    sock = _bind_api("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    async with server:
        port = sock.getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await asyncio.wait_for(accepted, 5.0) != 0
        finally:
            writer.close()
            await writer.wait_closed()
