#!/usr/bin/env python3
"""Alert recall, precision and delay of `stpm run` on a labelled conveyor video.

The input is a labelled conveyor clip (made with development tooling outside the product): an MP4 plus a JSON sidecar that says, per part on the belt, whether it is defective and
in which frames its defect is visible. This script plays the video through the real `stpm run`
(file source at the file's frame rate, like a camera; alerts to a real MQTT broker), records every
`<prefix>/<camera>/events` message with its arrival time (mosquitto_sub), and scores them:

- an event is a true positive when the frame it started on shows a defective part whose box holds
  the centre of the event's first box (frames are counted from the event's `start_time`, which is
  the worker's stream-time origin, printed by `stpm run`, plus the frame timestamp);
- recall  = defective parts with at least one true-positive event / defective parts;
- precision = true-positive events / all events (a second event on the same part counts as true);
  a part the sidecar's `parts` list leaves out (e.g. a clip cut from a longer video, whose defect
  was already in view at its start) counts for precision only;
- delay = arrival of the `new` message − the moment the part's defect became visible
  (`defect_first_visible_frame`, at least half of the defect in view), in stream time. Realtime
  playback starts a little after the stream-time origin, so the delay is if anything overstated.

Standard library only. Needs `mosquitto_sub` and a broker (default 127.0.0.1:1883).

    python3 scripts/dev/alert_recall.py --stpm target/release/stpm --model engines/X \\
        --video DIR/video/brick_conveyor.mp4 [--video ...] [--set alerts.k=2 ...] [--json out.json]
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ORIGIN = re.compile(r"\[(?P<cam>[^\]]+)\] stream time 0 = unix (?P<t>[0-9.]+)")


def pipeline_toml(model, video, prefix, host, port, spool, record_dir):
    return f"""
[model]
bundle = "{os.path.abspath(model)}"
provider = "cpu"

[[camera]]
name = "line1"
source = "file://{os.path.abspath(video)}"
loop = false
realtime = true

[output.record]
enabled = true
dir = "{record_dir}"

[output.rtsp]
enabled = false

[http]
enabled = false

[mqtt]
host = "{host}"
port = {port}
prefix = "{prefix}"

[alerts]
spool_dir = "{spool}"
"""


def play(args, video):
    """Runs `stpm run` on one video; returns (origin unix seconds, [(arrival, event dict)])."""
    prefix = "recall-" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        toml = os.path.join(tmp, "pipeline.toml")
        with open(toml, "w") as f:
            f.write(pipeline_toml(args.model, video, prefix, args.host, args.port,
                                  os.path.join(tmp, "spool"), os.path.join(tmp, "rec")))
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", args.host, "-p", str(args.port), "-q", "1",
             "-t", f"{prefix}/+/events", "-F", "%U|%p"],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        cmd = [args.stpm, "run", "--pipeline", toml]
        for s in args.set:
            cmd += ["--set", s]
        run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        sub.send_signal(signal.SIGINT)
        out, _ = sub.communicate(timeout=10)
    if run.returncode != 0:
        sys.exit(f"stpm run failed on {video} (exit {run.returncode}):\n{run.stderr[-3000:]}")
    m = ORIGIN.search(run.stderr)
    if not m:
        sys.exit("stpm run did not print its stream-time origin (\"stream time 0 = unix …\")")
    events = []
    for line in out.splitlines():
        arrival, _, payload = line.partition("|")
        try:
            events.append((float(arrival), json.loads(payload)))
        except ValueError:
            continue
    return float(m.group("t")), events


def score(labels, origin, events):
    fps = labels["fps"]
    parts = {p["id"]: p for p in labels["parts"]}
    frames = labels["frames"]
    defective = [p for p in labels["parts"] if p["defective"]]
    news = [(a, e) for a, e in events if e.get("type") == "new"]
    found = {}
    rows = []
    tp = 0
    for arrival, e in news:
        f = round((e["start_time"] - origin) * fps)
        f = min(max(f, 0), len(frames) - 1)
        box = e["boxes"][0] if e.get("boxes") else None
        hit = None
        if box:
            cx = (box["x"] + box["w"] / 2) * labels["width"]
            cy = (box["y"] + box["h"] / 2) * labels["height"]
            for p in frames[f]["parts"]:
                x0, y0, x1, y1 = p["bbox"]
                if p["defective"] and x0 <= cx < x1 and y0 <= cy < y1:
                    hit = p["id"]
        if hit is not None:
            tp += 1
        if hit in parts:
            part = parts[hit]
            visible = part["defect_first_visible_frame"]
            delay = arrival - (origin + visible / fps) if visible is not None else None
            if hit not in found:
                found[hit] = delay
        rows.append(dict(start_frame=f, part=hit, arrival_after_origin=round(arrival - origin, 3),
                         top_score=e.get("top_score")))
    missed = [dict(id=p["id"], type=p["defect_type"], area_px=p["area_px"], tiny=p["tiny"])
              for p in defective if p["id"] not in found]
    timeline = [dict(type=e.get("type"), id=e.get("id"),
                     frame=round(((e.get("end_time") or e["start_time"]) - origin) * fps)
                     if e.get("type") == "end" else round((e["start_time"] - origin) * fps),
                     arrival_frame=round((a - origin) * fps), score=e.get("score"))
                for a, e in events]
    return dict(timeline=timeline, defective_parts=len(defective), detected_parts=len(found), events=len(news),
                true_events=tp, delays_s=[d for d in found.values() if d is not None],
                missed=missed, detail=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stpm", default="target/release/stpm")
    ap.add_argument("--model", required=True, help="bundle directory")
    ap.add_argument("--video", action="append", required=True,
                    help="labelled conveyor MP4 (its .json sidecar next to it); repeatable")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--set", action="append", default=[], help="passed to stpm run --set")
    ap.add_argument("--json", help="write the per-video results here")
    args = ap.parse_args()
    results = []
    for video in args.video:
        with open(os.path.splitext(video)[0] + ".json") as f:
            labels = json.load(f)
        origin, events = play(args, video)
        r = score(labels, origin, events)
        r["video"] = video
        results.append(r)
        print(f"{video}: defective parts {r['defective_parts']}, detected {r['detected_parts']}, "
              f"events {r['events']} ({r['true_events']} on a defective part), "
              f"delays {[round(d, 2) for d in r['delays_s']]} s, missed {r['missed']}")
    parts = sum(r["defective_parts"] for r in results)
    found = sum(r["detected_parts"] for r in results)
    events = sum(r["events"] for r in results)
    true = sum(r["true_events"] for r in results)
    delays = [d for r in results for d in r["delays_s"]]
    summary = dict(defective_parts=parts, detected_parts=found,
                   recall=found / parts if parts else None,
                   events=events, true_events=true,
                   precision=true / events if events else None,
                   median_delay_s=statistics.median(delays) if delays else None,
                   max_delay_s=max(delays) if delays else None)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, videos=results), f, indent=1)


if __name__ == "__main__":
    main()
