"""Two or more exports of a graph timed side by side on the same composite-dev batches (ONNX Runtime CPU).

    python bench/graphs_side_by_side.py rows=OLD/dasr_moments.onnx blocked=NEW/dasr_moments.onnx \
        forward=NEW/backbone.onnx --batches 1 8

For a change to an exported graph (e.g. DasrMoments' layout): each round runs every graph once on one batch,
in turn, so that load on the machine falls on all of them alike. Moments graphs get the service's functionals
(at --stride); their outputs are compared with the first graph's. Prints a markdown table:
median ms per image and the ratio to the first graph, per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from dasr import load_inputs, markdown

from inserve.engines import EngineOptions, open_engine
from inserve.server.evaluation import Dataset
from inserve.server.stages.dasr import batch_functionals


def feeds_for(engine, pixels: np.ndarray, stride: int) -> dict[str, np.ndarray]:
    if "functionals" not in engine.input_names:
        return {"image": pixels}
    sizes = [pixels.shape[2:]] * len(pixels)
    return {"image": pixels, "functionals": batch_functionals(pixels, sizes, stride)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", help="label=path, the first is the reference")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/composite-dev"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--stride", type=int, default=8, help="the moments graphs' stop stride")
    args = parser.parse_args()
    dataset = Dataset.load(args.data)
    positives = [n for n in dataset.images if n.endswith(("_1.jpg", "_2.jpg", "_3.jpg"))][: args.images]
    inputs = [i.pixels for i in load_inputs(dataset, positives, 32)]
    shape = max(set(p.shape for p in inputs), key=[p.shape for p in inputs].count)
    inputs = [p for p in inputs if p.shape == shape]  # one shape: no bucket padding in the comparison
    options = EngineOptions(device="cpu", intra_op_threads=args.threads)
    labelled = [g.split("=", 1) for g in args.graphs]
    engines = [(label, open_engine(Path(path), options)) for label, path in labelled]
    rows = []
    for batch in args.batches:
        batches = [np.stack(inputs[i : i + batch]) for i in range(0, len(inputs) - batch + 1, batch)]
        spent = {label: [] for label, _ in engines}
        for pixels in batches[:1] + batches:  # the first round warms up
            reference = None
            for label, engine in engines:
                feeds = feeds_for(engine, pixels, args.stride)
                start = time.perf_counter()
                out = engine.run(feeds)
                spent[label].append((time.perf_counter() - start) / len(pixels))
                if "moments" in out:
                    if reference is None:
                        reference = out["moments"]
                    else:
                        scale = np.abs(reference).max()
                        assert np.abs(out["moments"] - reference).max() <= 1e-4 * scale, f"{label}: moments differ"
        first = statistics.median(spent[engines[0][0]][1:])
        for label, _ in engines:
            ms = statistics.median(spent[label][1:])
            rows.append({"graph": label, "batch": batch, "ms per image": 1000 * ms, "/ first": ms / first})
    print(f"{len(inputs)} composite-dev positives at {shape[2]}x{shape[1]}\n\n" + markdown(rows))


if __name__ == "__main__":
    main()
