#!/usr/bin/env python3
"""The stdlib ceiling as http.server's documentation writes a handler: a reference.

    python bench/stdlib.py --port 0

Everything as in ceiling.py (ThreadingHTTPServer, HTTP/1.1 keep-alive,
TCP_NODELAY, the body parsed with json.loads, nothing stored), except the 200:
send_response(), send_header(), end_headers(), then the body, as
BaseHTTPRequestHandler's documentation shows. That adds the Server and Date
headers and sends the head and the body in two writes, two segments with
TCP_NODELAY.

Issue 8's table gives its ceiling 12,109 req/s at c=16; on the same machine
type this server does about 12,500 and ceiling.py about 20,000. The benchmark
takes its ratios against ceiling.py, and shows this one beside it (`x stdlib`)
so the issue's own figures can be compared.
"""

from ceiling import REPLY, Handler, serve


class DocumentedHandler(Handler):
    def reply(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)


if __name__ == "__main__":
    serve(DocumentedHandler)
