#!/usr/bin/env python3
"""Checks used by scripts/autobahn (Python 3 standard library only).

  autobahn_check.py report reports/autobahn/index.json [--min-cases N]
      Judges an Autobahn fuzzingclient report. Fails when it holds fewer than N cases (wstest
      exits 0 and writes an empty report when it could not connect), when any case's behavior is
      FAILED or UNIMPLEMENTED, or when any case's behaviorClose is not OK or INFORMATIONAL.
      NON-STRICT (for example a late fail-fast on invalid UTF-8) is allowed. Prints a summary line.

  autobahn_check.py realtime 127.0.0.1:PORT
      Opens a realtime WebSocket and waits for herald's `connected` message.
"""

import base64
import json
import os
import socket
import sys

# Cases 1-7, 9 and 10 of Autobahn|Testsuite 25.10.1 (12.* and 13.* excluded) number 301.
MIN_CASES = 300
BAD_BEHAVIOR = {"FAILED", "UNIMPLEMENTED"}
GOOD_CLOSE = {"OK", "INFORMATIONAL"}
COUNTED = ["OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED"]


def case_key(case_id):
    return [int(part) for part in case_id.split(".")]


def check_report(path, min_cases):
    with open(path) as f:
        agents = json.load(f)
    cases = {cid: c for per_agent in agents.values() for cid, c in per_agent.items()}
    counts = {name: 0 for name in COUNTED}
    problems = []
    for cid in sorted(cases, key=case_key):
        c = cases[cid]
        counts[c["behavior"]] = counts.get(c["behavior"], 0) + 1
        if c["behavior"] in BAD_BEHAVIOR or c["behaviorClose"] not in GOOD_CLOSE:
            problems.append(
                f"  case {cid}: behavior {c['behavior']}, close {c['behaviorClose']}, "
                f"remote close code {c.get('remoteCloseCode')} ({c.get('reportfile')})"
            )
    if len(cases) < min_cases:
        problems.append(f"  only {len(cases)} cases ran, expected at least {min_cases}")
    for line in problems:
        print(line)
    summary = " / ".join(f"{counts[name]} {name}" for name in COUNTED[:4])
    if counts["UNIMPLEMENTED"]:
        summary += f" / {counts['UNIMPLEMENTED']} UNIMPLEMENTED"
    verdict = "FAIL" if problems else "ok"
    print(f"autobahn: {verdict}: {len(cases)} cases: {summary}")
    return not problems


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed early")
        buf += chunk
    return buf


def check_realtime(addr):
    host, port = addr.rsplit(":", 1)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /v1/realtime?project=autobahn&channels[]=files HTTP/1.1\r\n"
        f"Host: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += read_exact(sock, 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            print(f"realtime: upgrade refused: {status.decode(errors='replace')}")
            return False
        b0, b1 = read_exact(sock, 2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(read_exact(sock, 2), "big")
        elif length == 127:
            length = int.from_bytes(read_exact(sock, 8), "big")
        payload = read_exact(sock, length)
        if b0 & 0x0F != 1:
            print(f"realtime: first frame has opcode {b0 & 0x0F}, expected text")
            return False
        msg = json.loads(payload)
        if msg.get("type") != "connected" or msg["data"].get("channels") != ["files"]:
            print(f"realtime: unexpected first message {payload!r}")
            return False
        # Close politely: a masked close frame with code 1000.
        sock.sendall(bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]))
    return True


def main(argv):
    if len(argv) >= 2 and argv[0] == "report":
        min_cases = MIN_CASES
        if "--min-cases" in argv:
            min_cases = int(argv[argv.index("--min-cases") + 1])
        return 0 if check_report(argv[1], min_cases) else 1
    if len(argv) == 2 and argv[0] == "realtime":
        return 0 if check_realtime(argv[1]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
