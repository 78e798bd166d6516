#!/usr/bin/env python3
"""The many-camera table (issue 26): `stpm run` with N cameras of the generated conveyor (640x480 unless --size says otherwise), each recorded, paced at 25 frames/s like real cameras and as fast as the pipeline takes them, with batching across cameras off (model.batch = 1) and on (model.batch = min(N, 32)). For each run:
aggregate analysed frames/s (steady state, between the first scrape with analysed frames and the
last), frames dropped, end-to-end latency (appsink to encoded frame: median of the cameras' p50,
worst camera's p95, over each camera's last 1000 frames), mean ms per stage, CPU cores used.

Usage (from the repository root; stdlib only):

    scripts/dev/scale_table.py [--bundle <bundle>] [--stpm PATH] [--cameras 1 8 32 64]
        [--size 640x480 1920x1080] [--source generated|file]
        [--modes paced fast] [--batching off on] [--seconds 12] [--frames 150]
        [--provider auto] [--out DIR]

--source generated: each camera is test://conveyor?size=WxH (frames drawn on the CPU, no decode).
--source file: each camera plays one H.264 Matroska file of the conveyor (decoded like a camera's
stream: NVDEC where the engine is on a GPU and nvcodec has a decoder), made once per size in
DIR/files by a one-camera `stpm run` that records it (annotated: the file shows that run's
overlay, so the model sees it too and the overlay and alert stages are not comparable with
generated runs), --seconds x 25 frames long; paced and fast runs both play it once.

Without --bundle, trains a one-epoch bundle on a generated set first (as scripts/gpu-check.sh
does; kept in DIR/bundle for the next call). Prints a Markdown table and writes it, with each
run's log and last /metrics samples, to DIR (default $OUT/scale-table, else /tmp/scale-table). Made for the GPU machine (the goal there: 64
cameras at 25 frames/s with p95 <= 100 ms and no drops); runs anywhere stpm does. One live run
with RTSP clients, measured over a window: live_measure.py, whose /metrics reader this uses.
"""

import argparse
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_measure import scrape as read_metrics  # noqa: E402

FPS = 25


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline(work, bundle, sources, paced, port):
    """A pipeline of one camera per source URI, each recorded under work/recordings; /metrics on
    `port` (no HTTP server when None)."""
    text = f'[model]\nbundle = "{bundle}"\n'
    for k, source in enumerate(sources):
        text += (f'[[camera]]\nname = "cam{k + 1}"\nsource = "{source}"\n'
                 f'realtime = {"true" if paced else "false"}\n')
    text += (f'[output.record]\nenabled = true\ndir = "{work}/recordings"\n'
             f'[output.rtsp]\nenabled = false\n')
    if port is None:
        return text + '[http]\nenabled = false\n'
    return text + f'[http]\nenabled = true\nbind = "127.0.0.1:{port}"\nlive = false\n'


def scrape(port):
    """The samples of /metrics as (name, labels dict, value), or None while it does not answer."""
    try:
        metrics = read_metrics(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    return [(name, dict(labels), value) for (name, labels), value in metrics.items()]


def total(samples, name):
    return sum(v for n, _, v in samples if n == name)


def conveyor(size, frames, seed):
    return f"test://conveyor?frames={frames}&fps={FPS}&seed={seed}&size={size}"


def make_file(args, out, size):
    """The conveyor at `size` as an H.264 Matroska file of --seconds x 25 frames, made once: it is
    recorded in a scratch folder that is renamed only when the run succeeded, so an interrupted or
    failed run leaves nothing that a later call would take."""
    frames = FPS * args.seconds
    folder = out / "files" / f"{size}-{frames}f"
    made = sorted(folder.glob("recordings/*.mkv"))
    if made:
        return made[0]
    scratch = out / "files" / f"{size}-{frames}f.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    print(f"scale_table: recording a {size} conveyor file of {frames} frames", flush=True)
    toml = scratch / "make.toml"
    toml.write_text(pipeline(scratch, args.bundle, [conveyor(size, frames, 1)], False, None))
    with open(scratch / "make.log", "w") as log:
        status = subprocess.run([args.stpm, "run", "--pipeline", str(toml), "--set",
                                 f"model.provider={args.provider}"], stdout=log,
                                stderr=subprocess.STDOUT).returncode
    made = sorted(scratch.glob("recordings/*.mkv"))
    if status != 0 or len(made) != 1:
        sys.exit(f"scale_table: recording the {size} file failed (exit {status}, {len(made)} "
                 f"recordings): see {scratch}/make.log")
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    return folder / "recordings" / made[0].name


def run_one(args, work, cameras, paced, batch, size, file):
    port = free_port()
    if file:
        sources = [f"file://{file.resolve()}"] * cameras
    else:
        frames = FPS * args.seconds if paced else args.frames
        sources = [conveyor(size, frames, k + 1) for k in range(cameras)]
    name = f"{size}-{'file' if file else 'gen'}-n{cameras}-{'paced' if paced else 'fast'}-batch{batch}"
    toml = work / f"{name}.toml"
    toml.write_text(pipeline(work / name, args.bundle, sources, paced, port))
    log = open(work / f"{name}.log", "w")
    cmd = [args.stpm, "run", "--pipeline", str(toml), "--set", f"model.batch={batch}",
           "--set", f"model.provider={args.provider}"]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    first = last = None  # (time, analysed, cpu seconds)
    samples = None
    while proc.poll() is None:
        scraped = scrape(port)
        if scraped:
            point = (time.time(), total(scraped, "stpm_frames_analysed_total"),
                     total(scraped, "process_cpu_seconds_total"))
            if point[1] > 0:
                first = first or point
                last, samples = point, scraped
        time.sleep(0.5)
    wall = time.time() - started
    log.close()
    row = {"name": name, "cameras": cameras, "size": size,
           "mode": ("paced 25/s" if paced else "as fast") + (", file" if file else ""),
           "batch": batch, "status": proc.returncode, "wall": wall}
    if samples is None:
        return row
    span = last[0] - first[0]
    row["fps"] = (last[1] - first[1]) / span if span > 0 else float("nan")
    row["cores"] = (last[2] - first[2]) / span if span > 0 else float("nan")
    # Totals from the run's closing lines (the last scrape may miss the last frames).
    summary = re.findall(r"^camera \S+: (\d+) frames, (\d+) analysed, (\d+) dropped",
                         (work / f"{name}.log").read_text(), re.M)
    row["frames"] = sum(int(f) for f, _, _ in summary)
    row["dropped"] = sum(int(d) for _, _, d in summary)
    recent = {}
    for n, labels, v in samples:
        if n == "stpm_stage_recent_seconds" and labels.get("stage") == "end_to_end":
            recent.setdefault(labels.get("quantile"), []).append(v * 1e3)
    p50s, p95s = sorted(recent.get("0.5", [])), recent.get("0.95", [])
    row["p50"] = p50s[len(p50s) // 2] if p50s else float("nan")
    row["p95"] = max(p95s) if p95s else float("nan")
    sums, counts = {}, {}
    for n, labels, v in samples:
        stage = labels.get("stage")
        if n == "stpm_stage_seconds_sum":
            sums[stage] = sums.get(stage, 0.0) + v
        elif n == "stpm_stage_seconds_count":
            counts[stage] = counts.get(stage, 0.0) + v
    (work / f"{name}.metrics.txt").write_text(
        "".join(f"{n} {sorted(labels.items())} {v}\n" for n, labels, v in samples))
    row["stages"] = ", ".join(f"{s} {sums[s] / counts[s] * 1e3:.2f}" for s in sums
                              if counts.get(s) and s != "end_to_end")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="default: a one-epoch bundle trained in DIR/bundle")
    parser.add_argument("--stpm", default=os.environ.get("STPM", "target/release/stpm"))
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--size", nargs="+", default=["640x480"],
                        help="camera frame sizes, WIDTHxHEIGHT (each even, 64 to 4096)")
    parser.add_argument("--source", choices=["generated", "file"], default="generated")
    parser.add_argument("--modes", nargs="+", choices=["paced", "fast"], default=["paced", "fast"])
    parser.add_argument("--batching", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--seconds", type=int, default=12, help="length of a paced run")
    parser.add_argument("--frames", type=int, default=150,
                        help="frames per camera of a generated run as fast as possible (with "
                             "--source file, both modes play the --seconds x 25 frame file)")
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not (Path(args.stpm).is_file() or shutil.which(args.stpm)):
        sys.exit(f"scale_table: no stpm at {args.stpm} (--stpm or STPM)")
    out = Path(args.out or (Path(os.environ["OUT"]) / "scale-table" if "OUT" in os.environ
                            else "/tmp/scale-table"))
    out.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        args.bundle = out / "bundle"
        if not (args.bundle / "stpm.toml").is_file():
            print("scale_table: training a one-epoch bundle", flush=True)
            subprocess.run([args.stpm, "devset", "--out", str(out / "train"), "--train", "40"],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run([args.stpm, "train", "--data", str(out / "train"), "--out",
                            str(args.bundle), "--epochs", "1", "--quiet"], check=True)
    if not Path(args.bundle, "stpm.toml").is_file():
        sys.exit(f"scale_table: {args.bundle} is not a bundle (no stpm.toml)")
    args.bundle = str(Path(args.bundle).resolve())
    for size in args.size:
        sides = re.fullmatch(r"(\d+)x(\d+)", size)
        if not sides or not all(64 <= int(v) <= 4096 and int(v) % 2 == 0 for v in sides.groups()):
            sys.exit(f"scale_table: --size {size}: give WIDTHxHEIGHT, each even and 64 to 4096 "
                     "(e.g. 1920x1080)")
    files = {size: make_file(args, out, size) if args.source == "file" else None
             for size in args.size}
    header = ("| size | cameras | frames | batch | analysed frames/s | dropped "
              "| e2e p50 / worst p95 ms | cores | mean ms per stage | exit |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    lines = [header]
    for size, cameras, mode, batching in itertools.product(args.size, args.cameras, args.modes,
                                                           args.batching):
        batch = min(cameras, 32) if batching == "on" else 1
        if batching == "on" and batch == 1 and "off" in args.batching:
            continue  # the same run as batching off
        row = run_one(args, out, cameras, mode == "paced", batch, size, files[size])
        if "fps" in row:
            line = (f"| {row['size']} | {row['cameras']} | {row['mode']} | {row['batch']} | "
                    f"{row['fps']:.1f} | {row['dropped']} of {row['frames']} | "
                    f"{row['p50']:.1f} / {row['p95']:.1f} | {row['cores']:.1f} | "
                    f"{row['stages']} | {row['status']} |")
        else:
            line = (f"| {row['size']} | {row['cameras']} | {row['mode']} | {row['batch']} | "
                    f"no metrics (see {row['name']}.log) | | | | | {row['status']} |")
        print(line, flush=True)
        lines.append(line)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"scale_table: table, logs and scrapes in {out}")


if __name__ == "__main__":
    main()
