"""Runs a function written with the apache-flink-statefun Python SDK (3.3.0 from PyPI) over
HTTP and prints the request and response bytes: the golden bytes of
statefun-protocol/tests/python_sdk_golden.rs. Usage (docs/protocol.md):
  python3 -m venv /tmp/sfvenv && /tmp/sfvenv/bin/pip install apache-flink-statefun==3.3.0
  /tmp/sfvenv/bin/python statefun-protocol/tests/python/statefun_sdk_probe.py
"""
import threading, urllib.request
from http.server import ThreadingHTTPServer

from statefun.request_reply_pb2 import ToFunction, FromFunction
from statefun import types_pb2

from greeter_server import Handler, UserType  # the function under test

srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
port = srv.server_address[1]
threading.Thread(target=srv.serve_forever, daemon=True).start()
URL = f"http://127.0.0.1:{port}/statefun"

def post(req: ToFunction) -> FromFunction:
    data = req.SerializeToString()
    print("REQUEST  bytes (%d): %s" % (len(data), data.hex()))
    r = urllib.request.Request(URL, data=data, method="POST",
                               headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(r) as resp:
        body = resp.read()
        print("HTTP", resp.status, "Content-Type:", resp.headers.get("Content-Type"))
    print("RESPONSE bytes (%d): %s" % (len(body), body.hex()))
    ff = FromFunction(); ff.ParseFromString(body)
    print("RESPONSE oneof:", ff.WhichOneof("response"))
    print(ff)
    return ff

def base_request(states):
    req = ToFunction()
    b = req.invocation
    b.target.namespace, b.target.type, b.target.id = "com.example", "greeter", "alice"
    for name, tv in states:
        pv = b.state.add(); pv.state_name = name
        if tv is not None:
            pv.state_value.CopyFrom(tv)
    inv = b.invocations.add()
    inv.caller.namespace, inv.caller.type, inv.caller.id = "com.example", "ingress-fn", "x"
    w = types_pb2.StringWrapper(value="alice")
    inv.argument.typename = "io.statefun.types/string"
    inv.argument.has_value = True
    inv.argument.value = w.SerializeToString()
    return req

print("=== call 1: no state attached")
r1 = post(base_request([]))
print("=== call 2: states registered but empty (as the runtime sends right after registering)")
r2 = post(base_request([("seen_count", None), ("profile", None)]))
print("=== call 3: states carry values from call 2's mutations")
muts = {m.state_name: m.state_value for m in r2.invocation_result.state_mutations}
r3 = post(base_request([("seen_count", muts["seen_count"]), ("profile", muts["profile"])]))
print("=== primitive wrapper encodings (value field bytes)")
for cls, v in [(types_pb2.BooleanWrapper, True), (types_pb2.BooleanWrapper, False),
               (types_pb2.IntWrapper, 1), (types_pb2.IntWrapper, -1), (types_pb2.IntWrapper, 0),
               (types_pb2.LongWrapper, 1), (types_pb2.FloatWrapper, 1.5),
               (types_pb2.DoubleWrapper, 1.5), (types_pb2.StringWrapper, "hi"),
               (types_pb2.StringWrapper, "")]:
    print(f"{cls.__name__}({v!r}) -> {cls(value=v).SerializeToString().hex() or '(empty)'}")
print("JSON type bytes:", UserType.serializer().serialize({"name": "alice", "seen": 1}))
srv.shutdown()
