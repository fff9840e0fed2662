#!/usr/bin/env python3
"""A small Open Policy Agent server for Airlock's tests: OPA's own Go evaluator
(the `opa-golib-python-bindings` package) behind OPA's REST Data API.

    python3 server.py POLICY_DIR [--port N] [--token TOKEN]

Loads every `*.rego` in POLICY_DIR except `*_test.rego`, and `data.json` as the data
document, then serves on 127.0.0.1 only (port 0: any free port) and prints one line,
`listening on 127.0.0.1:PORT`, once it accepts connections.

    POST /v1/data/<path>   body {"input": ...}
      200 {"result": <document at data.<path>>, "decision_id": "<uuid>"}
      200 {"decision_id": "<uuid>"}                  when the document is undefined
      400 {"code": "invalid_parameter", ...}         body is not a JSON object
      401 {"code": "unauthorized", ...}              --token given and not sent
      500 {"code": "internal_error", ...}            evaluation error
    GET /health            200 {}

As OPA does with decision logging on, every answer carries a fresh decision_id; each
decision is also printed to stdout as one JSON line `{"decision_id", "path", "result"}`
(the server's decision log). The server exits when its standard input closes, so it
never outlives the test that started it.
"""

import argparse
import json
import os
import pathlib
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

MAX_BODY = 4 << 20


def load_engine(policy_dir: pathlib.Path) -> OpaEngine:
    engine = OpaEngine()
    files = sorted(p for p in policy_dir.iterdir() if p.is_file())
    modules = [p for p in files if p.suffix == ".rego" and not p.name.endswith("_test.rego")]
    if not modules:
        raise SystemExit(f"no .rego files in {policy_dir}")
    for path in modules:
        engine.add_policy(path.name, path.read_text())
    data = policy_dir / "data.json"
    if data.is_file():
        engine.add_data(json.loads(data.read_text()))
    return engine


def make_handler(engine: OpaEngine, token, log_lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: stdout is the decision log
            pass

        def reply(self, status: int, document) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, status: int, code: str, message: str) -> None:
            self.reply(status, {"code": code, "message": message})

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {})
            else:
                self.error(404, "resource_not_found", f"no such resource: {self.path}")

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                return self.error(413, "invalid_parameter", "request body too large")
            raw = self.rfile.read(length)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                return self.error(401, "unauthorized", "missing or invalid bearer token")
            prefix = "/v1/data"
            if not (self.path == prefix or self.path.startswith(prefix + "/")):
                return self.error(404, "resource_not_found", f"no such resource: {self.path}")
            path = self.path[len(prefix):].strip("/").replace("/", ".")
            try:
                body = json.loads(raw) if raw else {}
            except ValueError as e:
                return self.error(400, "invalid_parameter", f"body is not JSON: {e}")
            if not isinstance(body, dict):
                return self.error(400, "invalid_parameter", "body must be a JSON object")
            decision_id = str(uuid.uuid4())
            answer = {"decision_id": decision_id}
            try:
                answer["result"] = engine.eval_document(path, body.get("input"))
            except OpaUndefinedError:
                pass
            except OpaError as e:
                return self.error(500, "internal_error", str(e))
            with log_lock:
                print(json.dumps({"decision_id": decision_id, "path": path,
                                  "result": answer.get("result")}), flush=True)
            self.reply(200, answer)

    return Handler


def exit_when_stdin_closes() -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy_dir", type=pathlib.Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()

    engine = load_engine(args.policy_dir)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(engine, args.token, threading.Lock()))
    server.daemon_threads = True
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
