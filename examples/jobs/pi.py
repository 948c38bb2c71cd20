"""A plain Ray script (no Airflow in it): estimate pi with Ray tasks. Run as a Ray Job by
``example_ray_job``, or by hand: ``ray job submit --working-dir examples/jobs -- python pi.py``."""

import argparse
import random

import ray


@ray.remote(num_cpus=0.25)
def hits(samples: int, seed: int) -> int:
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))


parser = argparse.ArgumentParser()
parser.add_argument("--samples", type=int, default=100_000)
parser.add_argument("--shards", type=int, default=4)
args = parser.parse_args()

ray.init()
per_shard = args.samples // args.shards
total = sum(ray.get([hits.remote(per_shard, seed) for seed in range(args.shards)]))
for shard in range(args.shards):
    print(f"shard {shard}: {per_shard} samples", flush=True)
print(f"pi is about {4 * total / (per_shard * args.shards):.4f}")
