#!/usr/bin/env python3
"""fps, end-to-end latency and CPU use of a live `stpm run` with N cameras, read off /metrics.

Each camera is the generated conveyor (test://conveyor, 640×480 at --fps, default 25 frames/s, paced like a
camera), recorded to a scratch folder and served over RTSP with one real client per camera
(gst-launch-1.0 rtspsrc ! decodebin ! fakesink), alerts printed only. After a warm-up the script
scrapes /metrics twice, `--seconds` apart, and reports per camera the analysed frames/s, frames
dropped, and the end-to-end latency quantiles (appsink to encoded frame, the
`stpm_stage_recent_seconds` gauges over the last 1000 frames), plus the process CPU use
(`process_cpu_seconds_total`) as a share of one core and of all cores.

Standard library only; needs gst-launch-1.0 with rtspsrc (gstreamer1.0-plugins-good).

    python3 scripts/dev/live_measure.py --model engines/demo --cameras 1 [--seconds 60] [--json F]
"""

import argparse
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(url):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group("labels") or "")))
            out[(m.group("name"), labels)] = float(m.group("value"))
    return out


def pipeline_toml(args, tmp, http_port, rtsp_port):
    cams = "".join(f"""
[[camera]]
name = "cam{i + 1}"
source = "test://conveyor?seed={i + 1}&fps={args.fps}"
""" for i in range(args.cameras))
    return f"""
[model]
bundle = "{os.path.abspath(args.model)}"
provider = "{args.provider}"
precision = "{args.precision}"
sessions = {args.sessions}
{cams}
[output.record]
enabled = {str(not args.no_record).lower()}
dir = "{tmp}/rec"

[output.rtsp]
enabled = true
bind = "127.0.0.1"
port = {rtsp_port}

[http]
enabled = true
bind = "127.0.0.1:{http_port}"

[alerts]
spool_dir = "{tmp}/spool"
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stpm", default="target/release/stpm")
    ap.add_argument("--model", required=True)
    ap.add_argument("--cameras", type=int, default=1)
    ap.add_argument("--fps", type=float, default=25, help="frames/s of each generated camera")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--sessions", type=int, default=0, help="model.sessions (0: auto, 2 on the CPU)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--no-client", action="store_true", help="nobody watches the RTSP streams")
    ap.add_argument("--http-port", type=int, default=19090)
    ap.add_argument("--rtsp-port", type=int, default=18554)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        toml = os.path.join(tmp, "live.toml")
        with open(toml, "w") as f:
            f.write(pipeline_toml(args, tmp, args.http_port, args.rtsp_port))
        run = subprocess.Popen([args.stpm, "run", "--pipeline", toml],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{args.http_port}/metrics"
        deadline = time.time() + 60
        while True:
            try:
                scrape(url)
                break
            except OSError:
                if run.poll() is not None or time.time() > deadline:
                    out, err = run.communicate()
                    raise SystemExit(f"stpm run did not come up:\n{err[-3000:]}")
                time.sleep(0.5)
        clients = []
        if not args.no_client:
            for i in range(args.cameras):
                clients.append(subprocess.Popen(
                    ["gst-launch-1.0", "-q", "rtspsrc",
                     f"location=rtsp://127.0.0.1:{args.rtsp_port}/cam{i + 1}", "latency=0",
                     "protocols=tcp", "!", "decodebin", "!", "fakesink", "sync=false"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(args.warmup)
        t0, m0 = time.time(), scrape(url)
        time.sleep(args.seconds)
        t1, m1 = time.time(), scrape(url)
        for c in clients:
            c.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
        for c in clients:
            try:
                c.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.kill()
    span = t1 - t0
    cores = os.cpu_count() or 1
    cpu = (m1[("process_cpu_seconds_total", ())] - m0[("process_cpu_seconds_total", ())]) / span
    cameras = []
    for i in range(args.cameras):
        cam = f"cam{i + 1}"
        lab = (("camera", cam),)

        def delta(name):
            return m1.get((name, lab), 0.0) - m0.get((name, lab), 0.0)

        def q(stage, quantile):
            key = ("stpm_stage_recent_seconds",
                   tuple(sorted([("camera", cam), ("stage", stage), ("quantile", quantile)])))
            v = m1.get(key)
            return None if v is None else round(v * 1e3, 1)

        cameras.append(dict(
            camera=cam,
            frames_per_s=round(delta("stpm_frames_total") / span, 1),
            analysed_per_s=round(delta("stpm_frames_analysed_total") / span, 1),
            dropped=int(delta("stpm_frames_dropped_total")),
            end_to_end_p50_ms=q("end_to_end", "0.5"),
            end_to_end_p95_ms=q("end_to_end", "0.95"),
            inference_p50_ms=q("inference", "0.5"),
            overlay_p50_ms=q("overlay", "0.5"),
            encode_p50_ms=q("encode", "0.5"),
        ))
    report = dict(cameras=cameras, source_fps=args.fps, seconds=round(span, 1), clients=len(clients),
                  recording=not args.no_record,
                  cpu_percent_of_one_core=round(cpu * 100, 1),
                  cpu_percent_of_all_cores=round(cpu * 100 / cores, 1), cores=cores,
                  rss_mb=round(m1.get(("process_resident_memory_bytes", ()), 0) / 2**20, 1),
                  exit_status=run.returncode)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
