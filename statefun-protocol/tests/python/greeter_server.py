"""A function written with the apache-flink-statefun Python SDK (3.3.0), served over
HTTP the way StateFun's docs show (standard library server instead of aiohttp): the
live counterpart of the golden bytes, for statefun-protocol/tests/python_sdk_live.rs.
Run as a script: binds 127.0.0.1 on a free port, prints the port on stdout, serves until
stdin closes. statefun_sdk_probe.py imports the function and the handler from here.
"""
import os, sys, threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from statefun import (StatefulFunctions, RequestReplyHandler, Context, Message, ValueSpec,
                      IntType, StringType, make_json_type, message_builder, kafka_egress_message)

UserType = make_json_type("com.example/User")
functions = StatefulFunctions()


@functions.bind(typename="com.example/greeter",
                specs=[ValueSpec(name="seen_count", type=IntType),
                       ValueSpec(name="profile", type=UserType,
                                 expire_after_write=timedelta(minutes=5))])
def greeter(ctx: Context, message: Message):
    name = message.as_string()
    seen = (ctx.storage.seen_count or 0) + 1
    ctx.storage.seen_count = seen
    ctx.storage.profile = {"name": name, "seen": seen}
    ctx.send(message_builder(target_typename="com.example/printer", target_id=name,
                             str_value=f"Hello {name} #{seen}"))
    ctx.send_after(timedelta(seconds=2),
                   message_builder(target_typename="com.example/greeter", target_id=name, int_value=7),
                   cancellation_token="tok-1")
    ctx.cancel_delayed_message("tok-1")
    ctx.send_egress(kafka_egress_message(typename="com.example/out", topic=GREETINGS_TOPIC,
                                         key=name, value=f"hi {name}"))


# Where the greeter's Kafka egress records go (tests give each run its own topic).
GREETINGS_TOPIC = os.environ.get("GREETINGS_TOPIC", "greetings")


@functions.bind(typename="com.example/printer",
                specs=[ValueSpec(name="printed", type=StringType)])
def printer(ctx: Context, message: Message):
    ctx.storage.printed = message.as_string()


handler = RequestReplyHandler(functions)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            out = handler.handle_sync(body)
        except Exception as e:  # an unknown function type, a malformed request
            self.send_error(500, str(e))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()  # until the test closes stdin (or dies)
