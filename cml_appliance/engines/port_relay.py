"""Runs inside a workload's container: relays LISTEN_PORT on the container's addresses to
TARGET_PORT on 127.0.0.1, for connections from the appliance's address only.

CML asks applications (and our model replica server) to listen on 127.0.0.1:$CDSW_APP_PORT. In a
container on a bridge network, 127.0.0.1 is the container's own, out of the appliance's reach;
the container engine starts this relay in the container (docker exec, `python3 -c <this file>`)
so the appliance reaches the port at the container's address. Other containers on the bridge
are refused: they would otherwise reach apps and models past the appliance's checks. A
connection made before the target listens waits for it (up to WAIT_SECONDS) rather than failing,
as the workload starting up is no error. Standard library only.

Usage: python3 port_relay.py LISTEN_PORT TARGET_PORT ALLOWED_PEERS
ALLOWED_PEERS: addresses or networks, comma-separated (10.88.0.1,10.1.0.0/16), or * for any peer
(on Kubernetes, where the namespace's NetworkPolicy admits only the appliance).
"""

import asyncio
import ipaddress
import sys

WAIT_SECONDS = 10


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the answer may still be coming the other way
    except OSError:
        pass


def admitted(address, allowed):
    if allowed is None:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return any(ip in network for network in allowed)


def parse_peers(text):
    if text.strip() == "*":
        return None
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


async def relay(target_port, allowed, client_reader, client_writer):
    peer = client_writer.get_extra_info("peername")
    if not peer or not admitted(peer[0], allowed):
        client_writer.close()
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        try:
            app_reader, app_writer = await asyncio.open_connection("127.0.0.1", target_port)
            break
        except OSError:
            if loop.time() > deadline:
                client_writer.close()  # still not listening: the caller sees the connection close
                return
            await asyncio.sleep(0.1)
    try:
        await asyncio.gather(pump(client_reader, app_writer), pump(app_reader, client_writer))
    finally:
        app_writer.close()
        client_writer.close()


async def main(listen_port, target_port, allowed):
    server = await asyncio.start_server(
        lambda r, w: relay(target_port, allowed, r, w), "0.0.0.0", listen_port, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), parse_peers(sys.argv[3])))
