"""A model server that misbehaves on cue: a real OpenAI-compatible HTTP endpoint on 127.0.0.1 (http.server
in a thread) that answers each ``POST /v1/chat/completions`` with the next of its scripted replies."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loopback import free_port


class ModelServer:
    """``replies``: per request, one of ``("text", assistant text)``, ``("hang", seconds)``, ``("status",
    code)``, ``("body", content type, raw bytes)``. Past the end, the last reply repeats."""

    def __init__(self):
        self.replies: list[tuple] = []
        self.requests = 0
        self.release = threading.Event()  # ends every hang at once (teardown)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                reply = server.next_reply()
                kind = reply[0]
                try:
                    if kind == "hang":
                        server.release.wait(reply[1])
                        self._send(200, "application/json", _completion("<fast_answer>late</fast_answer>"))
                    elif kind == "text":
                        self._send(200, "application/json", _completion(reply[1]))
                    elif kind == "status":
                        self._send(reply[1], "application/json", json.dumps({"error": {"message": "boom"}}).encode())
                    else:
                        self._send(200, reply[1], reply[2])
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def _send(self, code, ctype, body):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def next_reply(self) -> tuple:
        with self.httpd_lock:
            i = min(self.requests, len(self.replies) - 1)
            self.requests += 1
            return self.replies[i]

    httpd_lock = threading.Lock()

    def script(self, *replies) -> None:
        with self.httpd_lock:
            self.replies, self.requests = list(replies), 0

    def __enter__(self) -> ModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
    ).encode()
