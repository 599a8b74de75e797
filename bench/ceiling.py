#!/usr/bin/env python3
"""The stdlib ceiling: the fastest plain http.server webhook receiver, storing nothing.

    python bench/ceiling.py --port 0

ThreadingHTTPServer, HTTP/1.1 keep-alive, TCP_NODELAY; each POST /hook has its
Content-Length body read and parsed with json.loads, then gets a 200 with a
small JSON body in a single write. Nothing is stored, so no durable receiver
built on the same standard library should expect to be much faster: the
benchmark (bench/bench.py) reports every target as a ratio to this one.

Prints `listening on http://127.0.0.1:PORT/hook` once it accepts connections,
and serves until SIGTERM. naive.py reuses this file with one store() override,
stdlib.py with one reply() override.
"""

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = "/hook"
REPLY = b'{"ok":true}'
# Status line, headers and body prebuilt: the reply leaves in one send(), so with
# TCP_NODELAY it is one segment, not a header segment followed by a body segment.
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: wrk and the fallback client reuse connections
    disable_nagle_algorithm = True  # a small reply must not wait for the client's delayed ACK

    def do_POST(self):
        if self.path != PATH:
            self.send_error(404)
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.send_error(411)
            return
        raw = self.rfile.read(int(length))
        try:
            event = json.loads(raw)
        except ValueError:
            self.send_error(400)
            return
        self.store(event, raw)
        self.reply()

    def store(self, event, raw):
        """The ceiling stores nothing; naive.py overrides this."""

    def reply(self):
        """The 200 in one write; stdlib.py overrides this."""
        self.wfile.write(RESPONSE)

    def log_message(self, format, *args):
        pass  # a log line per request would measure the terminal, not the server


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # 64 connections opened at once must not overflow the listen backlog
    daemon_threads = True  # idle keep-alive connections must not hold up the exit
    allow_reuse_address = True


def serve(handler_class, argv=None, parser=None):
    """Listen on 127.0.0.1, announce the URL, serve until SIGTERM; returns the parsed args."""
    parser = parser or argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 picks a free one)")
    args = parser.parse_args(argv)
    if hasattr(handler_class, "configure"):
        handler_class.configure(args)
    server = Server(("127.0.0.1", args.port), handler_class)
    # SystemExit out of serve_forever() runs the finally below, unlike the default SIGTERM death.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print("listening on http://127.0.0.1:%d%s" % (server.server_address[1], PATH), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return args


if __name__ == "__main__":
    serve(Handler)
