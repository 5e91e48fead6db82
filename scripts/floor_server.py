#!/usr/bin/env python3
"""The least a server of gcmd's design can do for a ping: the floor under gcmd's instructions.

gevent's StreamServer spawns one greenlet per client, which waits for its
socket to be readable (``wait_read``), reads what came (``recv``) and answers
each line with ``pong`` (``send``): no framing, no commands, no deadlines, no
caps, no log. ``scripts/bench --only gcmd,gevent_floor --instructions``
counts it beside gcmd: the difference is what gcmd itself spends on a
request; the floor is what any network core on gevent's cooperative socket
spends (the hub, two greenlet switches, a libev watcher, the socket calls).
Not a server to use: it answers every line with ``pong``. Stops on SIGTERM.

Run: python scripts/floor_server.py --port 9005
"""

import argparse
import signal

import gevent
from gevent.server import StreamServer
from gevent.socket import wait_read


def handle(sock, address) -> None:
    """Answer each line of the client with ``pong`` until it closes."""
    fd = sock.fileno()
    while True:
        wait_read(fd)
        data = sock.recv(65536)
        if not data:
            return
        sock.send(b"pong\n" * data.count(b"\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    args, _ = parser.parse_known_args()  # the options scripts/bench gives every server
    server = StreamServer((args.host, args.port), handle)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
