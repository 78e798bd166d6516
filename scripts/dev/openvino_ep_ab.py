#!/usr/bin/env python3
"""A/B of a bundle's graphs on ONNX Runtime's CPU provider and its OpenVINO execution provider.

Comparison only (not used by the product or CI). Needs `pip install onnxruntime-openvino numpy`
(the wheel bundles OpenVINO). Each configuration gets one session; after a warm-up, ROUNDS rounds
of 10 calls on the same random image alternate between them. Prints the provider each session
really got (the OpenVINO EP falls back to the CPU provider silently on an option it does not
know), the map's largest difference from fp32 on the CPU provider, and the median ms per call.

    python3 scripts/dev/openvino_ep_ab.py BUNDLE [--rounds 12] [--threads 2]
"""

import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    size = 256
    image = np.random.RandomState(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)

    def cpu(graph):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def openvino(graph, precision):
        config = json.dumps({"CPU": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}})
        provider = ("OpenVINOExecutionProvider", {"device_type": "CPU", "load_config": config})
        return ort.InferenceSession(graph, ort.SessionOptions(), providers=[provider])

    configs = []
    for name in ["model.onnx", "model.int8.onnx"]:
        graph = os.path.join(args.bundle, name)
        if not os.path.exists(graph):
            continue
        configs.append((f"{name} cpu", cpu(graph)))
        for precision in ["f32", "bf16"]:
            configs.append((f"{name} openvino {precision}", openvino(graph, precision)))
    reference = None
    for label, session in configs:
        for _ in range(5):
            anomaly_map = session.run(None, {"image": image})[0]
        reference = anomaly_map if reference is None else reference
        print(f"{label}: provider {session.get_providers()[0]}, map max {anomaly_map.max():.3f}, "
              f"max abs difference from fp32 cpu {np.abs(anomaly_map - reference).max():.4f}")
    times = {label: [] for label, _ in configs}
    for _ in range(args.rounds):
        for label, session in configs:
            start = time.perf_counter()
            for _ in range(10):
                session.run(None, {"image": image})
            times[label].append((time.perf_counter() - start) / 10 * 1000)
    for label, _ in configs:
        print(f"{label}: median {np.median(times[label]):.2f} ms, min {min(times[label]):.2f} ms")


if __name__ == "__main__":
    main()
