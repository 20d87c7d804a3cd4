"""What rebuilding one view costs in stage two, by what the cache stores as its source: milliseconds of one core per
view, for the student's size and the teacher's.

    python benchmarks/view_render.py --dataset ../shared/data/beans --sizes 128 224

"jpeg" is format 2's way (decode the stored file, then crop and resize the full image); "raw N" is format 3's (raw
8-bit pixels of the image with its shorter side reduced to N, then crop and resize). Boxes are random resized crops of
5-100% of the area, as the patient recipe draws them. Each figure is the median of --rounds passes over --images images.
"""

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from kdcache.data import ViewRecipe, from_raw_source, load_image_dataset, raw_source, undecoded


def milliseconds(render, count, rounds):
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        for index in range(count):
            render(index)
        timings.append((time.perf_counter() - started) / count * 1e3)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="output sizes (student, teacher)")
    parser.add_argument("--sources", type=int, nargs="+", default=[224, 256, 320], help="reduced source sizes")
    args = parser.parse_args()
    split = undecoded(load_image_dataset(args.dataset)[args.split], "image").select(range(args.images))
    files = [value["bytes"] for value in split["image"]]
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
    sides = sorted({min(image.size) for image in images})
    print(
        f"{len(images)} images of {args.dataset} [{args.split}], shorter sides {sides[0]}-{sides[-1]} px; ms of one core per view"
    )
    rows = []
    for size in args.sizes:
        recipe = ViewRecipe((size, size), Image.BICUBIC, scale=(0.05, 1.0))
        boxes = [recipe.sample(*image.size, index, 1)[0] for index, image in enumerate(images)]
        decode = milliseconds(lambda i: Image.open(io.BytesIO(files[i])).convert("RGB"), len(files), args.rounds)
        crop = milliseconds(
            lambda i, recipe=recipe, boxes=boxes: recipe.render(images[i], boxes[i]), len(images), args.rounds
        )
        rows.append((size, "jpeg (decode + crop + resize)", decode + crop))
        for source_size in args.sources:
            reduced = ViewRecipe((size, size), Image.BICUBIC, scale=(0.05, 1.0), source_size=source_size)
            sources = [raw_source(reduced.reduce(image)) for image in images]
            small = [from_raw_source(*source) for source in sources]
            small_boxes = [reduced.sample(*image.size, index, 1)[0] for index, image in enumerate(small)]
            rows.append(
                (
                    size,
                    f"raw {source_size} (crop + resize)",
                    milliseconds(
                        lambda i, reduced=reduced, sources=sources, boxes=small_boxes: reduced.render(
                            from_raw_source(*sources[i]), boxes[i]
                        ),
                        len(sources),
                        args.rounds,
                    ),
                )
            )
    for size, source, cost in rows:
        print(f"  view at {size:>3} px from {source:<32} {cost:6.2f} ms")
    bytes_per_image = {
        n: np.mean([len(raw_source(ViewRecipe((8, 8), 3, source_size=n).reduce(im))[0]) for im in images]) / 1e3
        for n in args.sources
    }
    print(
        f"  stored per image: jpeg {np.mean([len(f) for f in files]) / 1e3:.0f} KB; "
        + "; ".join(f"raw {n} {kb:.0f} KB" for n, kb in bytes_per_image.items())
    )


if __name__ == "__main__":
    main()
