#!/usr/bin/env python3
"""Connection hardening, measured: open N connections to a running datagate
that send only the HTTP/2 preface, and print its RSS and connection metrics
while they are held (and, with WAIT, again after WAIT seconds: past
server.idle_timeout they are closed).

    scripts/preface-flood.py GRPC_PORT METRICS_PORT PID N [WAIT]

Loopback only; the connections are closed when it ends. README
"Operating it", connection limits.
"""
import socket, sys, time, urllib.request
port, metrics_port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wait_after = float(sys.argv[5]) if len(sys.argv) > 5 else 0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def gauge(name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line.split()[1]
    return "-"
print(f"idle RSS {rss():.1f} MiB")
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(PREFACE)
    except OSError:
        pass
    socks.append(s)
time.sleep(3)
print(f"holding {n} preface-only: RSS {rss():.1f} MiB, open {gauge('grpc_connections_open')}, refused {gauge('grpc_connections_refused_total')}")
if wait_after:
    time.sleep(wait_after)
    print(f"after {wait_after}s: RSS {rss():.1f} MiB, open {gauge('grpc_connections_open')}, idle-closed {gauge('grpc_connections_idle_closed_total')}")
for s in socks: s.close()
