"""Training runs on beans, one after the other, one JSON line each: what BENCHMARKS.md's tables of validation accuracy
("Choosing the defaults", "Augmented views") were made with.

    python benchmarks/recipes.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \\
        --root runs '[{"name": "k1-lr1e-3-e20", "views": 1, "learning_rate": 1e-3, "epochs": 20},
                      {"name": "k8-e10", "views": 8, "learning_rate": 1e-3, "epochs": 10},
                      {"name": "k1-studentaug-e10", "views": 1, "learning_rate": 1e-3, "epochs": 10, "student_only_augment": true}]'

Each config names a run, its number of views (a cache ROOT/cache-kK is made once per K, or reused when up to date)
and any other keyword argument of `kdcache.train_student`. Lines go to stdout and to ROOT/results.jsonl.
"""

import argparse
import json
import time
from pathlib import Path

from kdcache.student.train import train_student
from kdcache.teacher.run import teacher_logits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--root", default="runs", help="folder for the caches, the students and results.jsonl")
    parser.add_argument("configs", help="a JSON list of run configs")
    args = parser.parse_args()
    root = Path(args.root)
    for config in json.loads(args.configs):
        views = config.pop("views", 1)
        name = config.pop("name")
        started = time.time()
        cache = teacher_logits(
            args.dataset, args.teacher, output=root / f"cache-k{views}", views=views, progress=False
        )
        stage_one = time.time() - started
        result = train_student(
            cache, output=root / "students" / name, progress=False, overwrite=True, logging_steps=50, **config
        )
        line = {
            "name": name,
            "views": views,
            **config,
            "best_val": result["best_eval_accuracy"],
            "best_epoch": result["best_epoch"],
            "seconds": result["seconds"],
            "stage_one_seconds": round(stage_one, 1),
            "history": [round(epoch["eval_accuracy"], 4) for epoch in result["history"]],
        }
        with open(root / "results.jsonl", "a") as results:
            results.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
