#!/usr/bin/env python3
"""Split a labelled conveyor clip into training frames and a test clip, for alert measurements.

A line is trained on its own good images, then watched: this cuts a labelled conveyor MP4
(with its JSON sidecar) at CUT seconds. Frames before the cut that show no defective part become
`OUT/train/good/*.png` (every STEP-th frame), the rest is re-encoded as `OUT/test.mp4` with
`OUT/test.json`, the sidecar shifted to the clip's frame numbers (parts whose defect was already in
view at the cut are left out of `parts`, so scripts/dev/alert_recall.py scores them for precision
only). Needs ffmpeg.

    python3 scripts/dev/split_conveyor_video.py DIR/video/brick_conveyor.mp4 OUT 45 3
    stpm train --data OUT --out engines/line --epochs 8
    python3 scripts/dev/alert_recall.py --model engines/line --video OUT/test.mp4
"""

import json
import os
import shutil
import subprocess
import sys


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    src, out, cut_s, step = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    with open(os.path.splitext(src)[0] + ".json") as f:
        m = json.load(f)
    fps = m["fps"]
    cut = int(cut_s * fps)
    os.makedirs(os.path.join(out, "train", "good"), exist_ok=True)
    busy = set()
    for p in m["parts"]:
        if p["defective"]:
            busy.update(range(p["first_frame_in_view"], p["last_frame_in_view"] + 1))
    keep = [f for f in range(0, cut, step) if f not in busy]
    every = os.path.join(out, "all")
    os.makedirs(every, exist_ok=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", src, "-frames:v", str(cut),
                    "-start_number", "0", os.path.join(every, "%05d.png")], check=True)
    for f in keep:
        shutil.copy(os.path.join(every, f"{f:05d}.png"),
                    os.path.join(out, "train", "good", f"f{f:05d}.png"))
    shutil.rmtree(every)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-ss", str(cut_s), "-i", src,
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "16", "-pix_fmt", "yuv420p",
                    os.path.join(out, "test.mp4")], check=True)
    test = dict(m)
    test["frames"] = [dict(fr, i=fr["i"] - cut) for fr in m["frames"][cut:]]
    test["n_frames"] = len(test["frames"])
    parts = []
    for p in m["parts"]:
        if p["last_frame_in_view"] < cut:
            continue
        q = dict(p)
        for k in ("first_frame_in_view", "last_frame_in_view", "defect_first_visible_frame",
                  "defect_last_visible_frame"):
            if q.get(k) is not None:
                q[k] -= cut
        if q["defective"] and (q.get("defect_first_visible_frame") is None
                               or q["defect_first_visible_frame"] < 0):
            continue  # the defect was already in view when the clip starts: not scored
        parts.append(q)
    test["parts"] = parts
    with open(os.path.join(out, "test.json"), "w") as f:
        json.dump(test, f)
    print(f"{out}: {len(keep)} training frames, test clip of {test['n_frames']} frames with "
          f"{sum(p['defective'] for p in parts)} defective parts")


if __name__ == "__main__":
    main()
