"""Augmentation throughput: em-unet's in-graph augmentation vs elasticdeform's TF op, side by side.

Both run in a tf.data map over the same 512x512 image+mask pairs with the same
parallelism (``--parallel`` calls, default: the number of cores), in one
process, alternating rounds so that machine noise hits both alike. em-unet's
pass does more work (affine + elastic + brightness/contrast in one resampling);
elasticdeform's op does the elastic deformation only (order 1 image, order 0
mask, mirrored borders, 3x3 grid, sigma 10 px).

    python benchmarks/augment_throughput.py [--pairs 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from em_unet.machine import machine_description  # noqa: E402
from em_unet.training.augment import AugmentConfig, augment_batch, import_elasticdeform  # noqa: E402


def pairs_dataset(pairs: int, size: int) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.random((8, size, size, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((images, masks)).repeat().take(pairs).cache()


def ours(pairs, size, parallel, batch):
    config = AugmentConfig()
    dataset = pairs_dataset(pairs, size).batch(batch).enumerate()
    return dataset.map(
        lambda i, b: augment_batch(b[0], b[1], tf.stack([tf.constant(0, tf.int64), i]), config),
        num_parallel_calls=parallel,
    )


def theirs(pairs, size, parallel):
    elasticdeform = import_elasticdeform()

    def deform(index, pair):
        image, mask = pair
        displacement = tf.random.stateless_normal([2, 3, 3], tf.stack([tf.constant(0, tf.int64), index]), stddev=10.0)
        image, mask = elasticdeform.tf.deform_grid(
            [image, mask], displacement, order=[1, 0], mode="mirror", axis=(0, 1)
        )
        return image, mask

    return pairs_dataset(pairs, size).enumerate().map(deform, num_parallel_calls=parallel)


def pairs_per_second(dataset, pairs) -> float:
    start = time.perf_counter()
    for _ in dataset:
        pass
    return pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="image+mask pairs per measurement (default 64)")
    parser.add_argument("--size", type=int, default=512, help="side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="em-unet's batch per map call (default 8)")
    parser.add_argument(
        "--parallel", type=int, default=os.cpu_count(), help="num_parallel_calls for both (default: cores)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; the best of each is kept (default 3)"
    )
    args = parser.parse_args()

    candidates = {
        f"em-unet, batched ({args.batch})": ours(args.pairs, args.size, args.parallel, args.batch),
        "em-unet, per pair": ours(args.pairs, args.size, args.parallel, 1),
        "elasticdeform.tf.deform_grid": theirs(args.pairs, args.size, args.parallel),
    }
    for dataset in candidates.values():  # warm-up: tracing and caching
        pairs_per_second(dataset, args.pairs)
    best = {name: 0.0 for name in candidates}
    for _ in range(args.rounds):
        for name, dataset in candidates.items():
            best[name] = max(best[name], pairs_per_second(dataset, args.pairs))

    print(f"machine: {machine_description()}; {args.size}x{args.size} px, parallel calls {args.parallel}")
    reference = best["elasticdeform.tf.deform_grid"]
    for name, rate in best.items():
        print(f"{name:34s} {rate:8.1f} pairs/s   {rate / reference:5.2f}x elasticdeform")


if __name__ == "__main__":
    main()
