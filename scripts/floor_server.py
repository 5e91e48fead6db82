#!/usr/bin/env python3
"""The I/O floor under gcmd's instructions per request: the least gevent's socket costs a ping.

gevent's StreamServer spawns one greenlet per client, which waits for its
socket to be readable (``wait_read``), reads what came (``recv``) and answers
each line with ``pong`` (``send`` until all is sent). It leaves out what the
protocol asks of gcmd: a part of a line kept for the next read, the line
length limit, commands, the idle deadline (and its sweeper), shutdown, caps,
the log. ``scripts/bench --only gcmd,gevent_floor --instructions`` counts it
beside gcmd: the floor is what any network core on gevent's cooperative
socket spends on a request (the hub, two greenlet switches, a libev watcher,
the socket calls); gcmd's count over it is the protocol and gcmd's own way
of serving it. Not a server to use: it answers every line with ``pong``.
Stops on SIGTERM.

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
        reply = b"pong\n" * data.count(b"\n")
        while reply:
            reply = reply[sock.send(reply):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--root", help="ignored (scripts/bench gives it to every server)")
    parser.add_argument("--logfile", help="ignored (scripts/bench gives it to every server)")
    args = parser.parse_args()
    server = StreamServer((args.host, args.port), handle)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
