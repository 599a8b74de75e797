#!/usr/bin/env python3
"""A forward target for the benchmark: the stdlib ceiling, counting, optionally holding its answers.

    python bench/sink.py --port 0 [--hold FILE] [--close] [--tls-cert PEM --tls-key PEM]

Everything as in ceiling.py (ThreadingHTTPServer, HTTP/1.1 keep-alive,
TCP_NODELAY, the body read and parsed, a 200 in one write). In addition:
- --hold FILE: every answer waits until FILE exists, so a backlog can pile up in
  wabhook behind the requests it has in flight, then drain at full speed;
- --close: answer with `Connection: close` (what forwarding costs without keep-alive);
- --tls-cert/--tls-key: HTTPS;
- on SIGTERM it prints `sink connections=N requests=M` (connections accepted,
  POSTs answered), so the benchmark can report how well connections were reused.
"""

import argparse
import os
import ssl
import threading
import time

from ceiling import REPLY, Handler, Server, serve

CLOSE_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY))


class SinkHandler(Handler):
    hold = None
    close = False
    lock = threading.Lock()
    connections = requests = 0

    @classmethod
    def configure(cls, args):
        cls.hold, cls.close = args.hold, args.close
        if args.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(args.tls_cert, args.tls_key)
            Server.get_request = lambda server: _tls_accept(server, context)

    def setup(self):
        super().setup()
        with self.lock:
            SinkHandler.connections += 1

    def store(self, event, raw):
        while self.hold and not os.path.exists(self.hold):
            time.sleep(0.02)
        with self.lock:
            SinkHandler.requests += 1
        if self.close:
            self.close_connection = True
            self.wfile.write(CLOSE_RESPONSE)
            raise _Answered()

    def do_POST(self):
        try:
            super().do_POST()
        except _Answered:
            pass


class _Answered(Exception):
    """store() sent the answer itself (Connection: close)."""


def _tls_accept(server, context):
    sock, address = server.socket.accept()
    return context.wrap_socket(sock, server_side=True), address


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hold", help="answer only once this file exists")
    parser.add_argument("--close", action="store_true", help="no keep-alive: Connection: close on every answer")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    try:
        serve(SinkHandler, parser=parser)
    finally:
        print("sink connections=%d requests=%d" % (SinkHandler.connections, SinkHandler.requests), flush=True)
