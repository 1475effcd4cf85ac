"""A model replica: serves one Python function over HTTP on 127.0.0.1:$CDSW_APP_PORT.

Standard library only, so it runs in any runtime with Python 3. The function runs for one
request at a time, as in CML's replicas; connections are kept alive (HTTP/1.1), each on a thread
of its own, so an idle one never holds up the others. POST / with a JSON body calls the function with it and answers
its return value as JSON (200), or {"error": "..."} with status 400 when the function raises or
returns something that is not JSON. The appliance wraps the answer in CML's shape without
parsing it again.

With CML_MODEL_SOCKET set (local replicas), it also serves the appliance on that Unix socket,
in frames rather than HTTP, which costs both sides a fraction of an HTTP request: a call is a
4-byte big-endian length and the JSON argument; the answer is a status byte (0: the body is the
function's return value as JSON; 1: the body is an error message in UTF-8), a 4-byte length and
the body. One connection carries one call at a time, as many calls in turn as the appliance likes.

Usage: python3 replica_server.py FILE FUNCTION
"""

import http.server
import importlib.util
import json
import os
import socketserver
import struct
import sys
import threading
import traceback

FRAME_OK, FRAME_ERROR = 0, 1


def load(path, name):
    spec = importlib.util.spec_from_file_location("cml_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    return getattr(module, name)


def main():
    path, name = sys.argv[1], sys.argv[2]
    function = load(path, name)
    one_at_a_time = threading.Lock()

    def call(data):
        """(True, the return value as JSON) or (False, why not), for a JSON argument."""
        try:
            argument = json.loads(data or b"null")
        except ValueError as exc:
            return False, f"the request is not JSON: {exc}"
        try:
            with one_at_a_time:
                result = function(argument)
        except Exception as exc:
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            return False, f"the model function raised {type(exc).__name__}: {exc}"
        try:
            return True, json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return False, f"the model function returned something that is not JSON: {exc}"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes: without TCP_NODELAY a kept-alive connection
        # would wait for the peer's delayed ACK (40 ms) between them.
        disable_nagle_algorithm = True

        def _answer(self, status, payload):
            self._send(status, json.dumps(payload).encode())

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._answer(200, {"ready": True})

        def do_POST(self):
            ok, answer = call(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if ok:
                self._send(200, answer.encode())
            else:
                self._answer(400, {"error": answer})

        def log_message(self, *args):
            pass

    print(f"serving {name} from {path}", flush=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler)
    server.daemon_threads = True
    socket_path = os.environ.get("CML_MODEL_SOCKET")
    if socket_path:

        class FrameHandler(socketserver.StreamRequestHandler):
            def handle(self):
                while True:
                    head = self.rfile.read(4)
                    if len(head) < 4:
                        return  # the appliance closed the connection
                    (size,) = struct.unpack(">I", head)
                    data = self.rfile.read(size)
                    if len(data) < size:
                        return
                    ok, answer = call(data)
                    body = answer.encode("utf-8", "replace")
                    self.wfile.write(struct.pack(">BI", FRAME_OK if ok else FRAME_ERROR, len(body)) + body)

        class LocalServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        threading.Thread(target=LocalServer(socket_path, FrameHandler).serve_forever, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
