"""How long SessionGraph takes to lay out and draw 200 sessions (seeded random DAGs).

Two shapes: "pipeline" (each session depends on up to three of the 20 before it, as
chained batch jobs are) and "random" (up to three of any earlier session: long edges,
many crossings to reduce). Each is timed as layout + SVG (``render_svg``, what every
redraw does), with the median of ``--runs`` and, measured in the same run, the ratio to
two baselines: drawing 20 sessions, and only serialising the 200-session graph to JSON
(what the API sends for it).

    python benchmarks/session_graph.py [--runs 30] [--nodes 200] [--seed 10]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from jupyter_gpu_sessions.kernel.graph import layout, render_svg

STATUSES = ["PENDING", "PREPARING", "RUNNING", "TERMINATED", "CANCELLED", "ERROR"]


def dag(n: int, seed: int, reach: int | None) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    nodes = [
        {
            "id": f"{rng.getrandbits(128):032x}",
            "name": f"job-{i:03d}",
            "status": rng.choice(STATUSES),
            "kind": "batch",
            "exit_code": rng.choice([0, 0, 0, 1]),
            "resources": {"gpus": rng.choice([0, 1, 2]), "cpus": 1, "memory": None},
        }
        for i in range(n)
    ]
    edges = []
    for i in range(1, n):
        lo = 0 if reach is None else max(0, i - reach)
        pool = range(lo, i)
        for j in rng.sample(pool, min(len(pool), rng.randint(0, 3))):
            edges.append({"from": nodes[j]["id"], "to": nodes[i]["id"]})
    return nodes, edges


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()

    head = ("graph", "edges", "crossings", "median ms", "vs 20", "vs JSON")
    print("{:<28} {:>6} {:>9} {:>10} {:>7} {:>8}".format(*head))
    for shape, reach in (("pipeline", 20), ("random", None)):
        nodes, edges = dag(args.nodes, args.seed, reach)
        small_nodes, small_edges = dag(20, args.seed, reach)
        body = {"nodes": nodes, "edges": edges}
        draw = median_ms(lambda n=nodes, e=edges: render_svg(n, e), args.runs)
        small = median_ms(lambda n=small_nodes, e=small_edges: render_svg(n, e), args.runs)
        as_json = median_ms(lambda b=body: json.dumps(b), args.runs)
        crossings = layout(nodes, edges).crossings
        print(
            f"{shape + f' {len(nodes)} nodes':<28} {len(edges):>6} {crossings:>9} "
            f"{draw:>10.2f} {draw / small:>6.1f}x {draw / as_json:>7.1f}x"
        )
        print(f"{shape + ' 20 nodes (baseline)':<28} {len(small_edges):>6} {'':>9} {small:>10.2f}")
        print(f"{shape + ' JSON (baseline)':<28} {'':>6} {'':>9} {as_json:>10.2f}")


if __name__ == "__main__":
    main()
