"""The target's HTTP service: queries/s and latency for 1, 10 and 100 concurrent clients, against
calling the same model in this process (the ratio is what the service costs).

    python benchmarks/target_service.py [--batch 16] [--requests 400] [--replicas 1]

Each level sends ``--requests`` requests in all (split over its clients, one API key each, every
request ``--batch`` bundled digits) to a LeNet-5 target served by Ray Serve on 127.0.0.1 with its
ledger journaled and fsynced; each client is a thread with its own ``TargetClient``. The reference
is ``models.predict`` on the same batches, one after another, in this process. Printed per level:
requests/s, images/s, p50 and p99 request latency, and images/s as a ratio of the reference.

Then the request-id cases, one raw HTTP request each (no client retries), with the HTTP status and
the images charged: a numeric and a boolean body id (refused, 400), header and body ids that
differ (400), one request id sent five times (charged once), and a request with no id
(answered with a server-made id, charged once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level (default 400)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--levels", default="1,10,100", help="concurrent clients per level (default 1,10,100)")
    args = p.parse_args(argv)

    import ray
    import torch

    from drmi_ray.client import TargetClient
    from drmi_ray.data import bundled_mnist
    from drmi_ray.models import TrainConfig, predict
    from drmi_ray.service import start_target, stop_target
    from drmi_ray.target import load_classifier, train_target

    torch.set_num_threads(1)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"command: {' '.join(sys.argv)}; {time.strftime('%Y-%m-%d %H:%M')}")
    images, labels = bundled_mnist()
    folder = tempfile.mkdtemp(prefix="drmi-target-bench-")
    checkpoint = os.path.join(folder, "target.pt")
    train_target(images[::5], labels[::5], checkpoint, config=TrainConfig(model="lenet5", epochs=1))
    batches = [images[(i * args.batch) % 4000:(i * args.batch) % 4000 + args.batch] for i in range(args.requests)]

    model = load_classifier(checkpoint)
    start = time.perf_counter()
    for b in batches:
        predict(model, b)
    reference = args.requests * args.batch / (time.perf_counter() - start)
    print(f"reference: predict() in this process, one thread: {reference:,.0f} images/s "
          f"({1000 * args.batch / reference:.2f} ms per batch of {args.batch})")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False)
    service = start_target(checkpoint, os.path.join(folder, "journal.jsonl"), port=port, replicas=args.replicas,
                           app="bench")
    print(f"service: {service.url}, {args.replicas} model replica(s), ledger journal fsynced per answer\n")
    print("| clients | requests | requests/s | images/s | p50 ms | p99 ms | images/s vs in-process |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level in (int(x) for x in args.levels.split(",")):
        per_client = max(1, args.requests // level)
        latencies: list[float] = []
        lock = threading.Lock()

        keys = [service.create_key(f"c{level}-{k}", budget=per_client * args.batch) for k in range(level)]

        def client_loop(k: int) -> None:
            client = TargetClient(service.url, keys[k], prefix=f"c{level}-{k}")
            mine = []
            for i in range(per_client):
                t = time.perf_counter()
                client.query(batches[(k * per_client + i) % len(batches)])
                mine.append(time.perf_counter() - t)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(level)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        n = len(latencies)
        ms = np.percentile(np.asarray(latencies) * 1000, [50, 99])
        rate = n * args.batch / wall
        print(f"| {level} | {n} | {n / wall:,.1f} | {rate:,.0f} | {ms[0]:.1f} | {ms[1]:.1f} | {rate / reference:.3f} |",
              flush=True)
    request_id_cases(service, images[4000:4008])
    stop_target(service)


def request_id_cases(service, images) -> None:
    """Print the request-id cases of the module doc: status and images charged per case."""
    key = service.create_key("ids", budget=1000)

    def send(body_id=None, header=None) -> int:
        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                            "data": images.reshape(-1).tolist()}]}
        if body_id is not None:
            body["id"] = body_id
        headers = {"Authorization": f"Bearer {key}", **({"Idempotency-Key": header} if header else {})}
        request = urllib.request.Request(f"{service.url}/v2/models/target/infer", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    cases = [("body id 5 (a number)", lambda: [send(5)], "400, 0 charged"),
             ("body id true", lambda: [send(True)], "400, 0 charged"),
             ("header 'a-1', body id 'a-2'", lambda: [send("a-2", "a-1")], "400, 0 charged"),
             ("id 'retry-1' sent 5 times", lambda: [send("retry-1") for _ in range(5)], f"200 x5, {len(images)} charged"),
             ("no id", lambda: [send()], f"200, {len(images)} charged")]
    print(f"\nrequest ids ({len(images)} images per request):\n")
    print("| case | HTTP status | images charged | expected |\n|---|---|---:|---|")
    for name, run, expected in cases:
        before = service.usage("ids")["used"]
        statuses = run()
        print(f"| {name} | {', '.join(map(str, statuses))} | {service.usage('ids')['used'] - before} | {expected} |",
              flush=True)


if __name__ == "__main__":
    main()
