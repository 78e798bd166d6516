#!/usr/bin/env python3
"""Measures the console's live view against a running `stpm run`: the CPU the stpm process uses
with 0, 1, 2, … viewers (each a headless Chromium session through chromedriver, watching the
first camera), and how far each viewer's video is behind the camera (the page's own measure: the
frame's capture time against the browser clock). Optionally saves a screenshot of the console.

    chromedriver --port=9515 &
    python3 scripts/dev/console_bench.py --url http://127.0.0.1:9090/ --pid $(pidof stpm) \
        --viewers 0,1,2,4 --seconds 60 [--screenshot docs/console.png] [--event]

Needs Debian's chromium and chromium-driver (scripts/setup.sh installs them); standard library
only.
"""
import argparse
import base64
import json
import os
import statistics
import time
import urllib.request

CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--autoplay-policy=no-user-gesture-required", "--window-size=1280,860"]


def call(driver, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(driver + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["value"]


def open_session(driver, url):
    caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": CHROME_ARGS}}}}
    session = call(driver, "POST", "/session", caps)["sessionId"]
    call(driver, "POST", f"/session/{session}/url", {"url": url})
    return session


def script(driver, session, text):
    return call(driver, "POST", f"/session/{session}/execute/sync", {"script": text, "args": []})


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the stpm run process")
    parser.add_argument("--driver", default="http://127.0.0.1:9515")
    parser.add_argument("--viewers", default="0,1,2,4")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=8)
    parser.add_argument("--screenshot", help="save the console (first viewer) as PNG here")
    parser.add_argument("--event", action="store_true",
                        help="open the newest event before the screenshot")
    args = parser.parse_args()
    latency_js = "return Number(document.getElementById('latency').dataset.seconds || NaN)"
    print("viewers | stpm CPU (cores) | behind the camera p50 / p95 (s) | samples")
    for count in [int(n) for n in args.viewers.split(",")]:
        sessions = [open_session(args.driver, args.url) for _ in range(count)]
        try:
            time.sleep(args.warmup)
            before, started = cpu_seconds(args.pid), time.monotonic()
            behind = []
            while time.monotonic() - started < args.seconds:
                time.sleep(1)
                for session in sessions:
                    value = script(args.driver, session, latency_js)
                    if isinstance(value, (int, float)) and value == value:
                        behind.append(value)
            cores = (cpu_seconds(args.pid) - before) / (time.monotonic() - started)
            if behind:
                behind.sort()
                p95 = behind[min(len(behind) - 1, int(0.95 * len(behind)))]
                shown = f"{statistics.median(behind):.3f} / {p95:.3f}"
            else:
                shown = "—"
            print(f"{count} | {cores:.3f} | {shown} | {len(behind)}", flush=True)
            if args.screenshot and sessions:
                if args.event:
                    script(args.driver, sessions[0],
                           "const row = document.querySelector('#events tr[data-id]');"
                           " if (row) row.click(); return true")
                    time.sleep(3)
                png = call(args.driver, "GET", f"/session/{sessions[0]}/screenshot")
                with open(args.screenshot, "wb") as out:
                    out.write(base64.b64decode(png))
                args.screenshot = None
        finally:
            for session in sessions:
                call(args.driver, "DELETE", f"/session/{session}")


if __name__ == "__main__":
    main()
