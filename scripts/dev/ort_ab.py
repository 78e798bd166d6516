#!/usr/bin/env python3
"""A/B timing of ONNX graphs in plain ONNX Runtime sessions, for comparisons of graph changes.

Comparison only (not used by the product or CI). Needs `pip install onnxruntime numpy`. Each graph
gets one session with THREADS intra-op threads; after a warm-up, ROUNDS rounds of 10 calls on the
same random 256x256 image alternate between the graphs, so a machine whose speed drifts affects
them alike. Prints the minimum, first quartile and median milliseconds per call.

    python3 scripts/dev/ort_ab.py THREADS a/model.onnx b/model.onnx [...] [--rounds 12]
"""

import argparse
import time

import numpy as np
import onnxruntime as ort


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=int)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    image = np.random.RandomState(0).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    sessions = []
    for path in args.models:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    for session in sessions:
        for _ in range(5):
            session.run(None, {"image": image})
    times = {path: [] for path in args.models}
    for _ in range(args.rounds):
        for path, session in zip(args.models, sessions):
            start = time.perf_counter()
            for _ in range(10):
                session.run(None, {"image": image})
            times[path].append((time.perf_counter() - start) / 10 * 1000)
    for path in args.models:
        t = sorted(times[path])
        print(f"{path}: min {t[0]:.2f} ms, q25 {t[len(t) // 4]:.2f} ms, median {np.median(t):.2f} ms")


if __name__ == "__main__":
    main()
