#!/usr/bin/env python
"""Router adaptation, task by task: what each way of setting the routers does to every task of a toy zoo.

For one toy-zoo preset and one MoE method it merges once, then for every variant starts from the merge as built
(task arithmetic everywhere), sets the routers (calibration and/or gradient steps) and prints, per task: accuracy
before and after, the method's own oracle-routing bound, how many classes the task's predictions use (the
exponential of the entropy of the marginal prediction on a fixed probe set of unlabelled images) before and
after, and the mean routing weight of the task's own expert before and after (and of the other experts after). A task whose predicted classes
fall below half of their start is marked as collapsing. The CPU time of every variant is printed with it.

Variants are `+`-joined words: `calibrated` (the training-free calibration), an objective (`entropy`, the
papers', or `infomax`), `routing[=W]` (the task-origin routing term, weight W, default 1) and `best` (keep the
best routers by the unlabelled criterion). Examples:

  python scripts/study_adaptation.py --preset plain                      # entropy vs the package default
  python scripts/study_adaptation.py --preset full --method e-wemoe --variant entropy --variant calibrated

Offline; the toy zoo is built on first use (about 4 minutes per preset on 2 CPU cores); each variant of 200
steps takes about a minute of CPU time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_VARIANTS = ("entropy", "calibrated", "calibrated+infomax+routing")


def parse_variant(text: str, steps: int, lr: float, batch_size: int, seed: int):
    """(calibrate, TrainOptions or None) of a variant string."""
    from hf_wemoe.adaptation import TrainOptions

    calibrate, options = False, {}
    for word in text.split("+"):
        name, _, value = word.partition("=")
        if name == "calibrated":
            calibrate = True
        elif name in ("entropy", "infomax"):
            options["objective"] = name
        elif name == "routing":
            options["routing_loss"] = float(value or 1.0)
        elif name == "best":
            options["keep_best"] = True
        else:
            raise SystemExit(f"error: unknown word {word!r} in variant {text!r}; see --help")
    if not options:
        return calibrate, None
    options.setdefault("objective", "entropy")
    options.setdefault("routing_loss", 0.0)
    return calibrate, TrainOptions(steps=steps, lr=lr, batch_size_per_task=batch_size, seed=seed, **options)


def others(routing: list[float], own: int) -> float:
    """Mean routing weight of the experts other than `own`."""
    rest = [weight for index, weight in enumerate(routing) if index != own]
    return sum(rest) / len(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--preset", default="plain", help="toy zoo preset (default: plain)")
    parser.add_argument("--zoo", default=None, help="toy zoo folder (default: the cache, built when missing)")
    parser.add_argument("--method", default="wemoe", choices=["wemoe", "e-wemoe"], help="(default: wemoe)")
    parser.add_argument("--variant", action="append", help=f"(repeatable; default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--steps", type=int, default=200, help="gradient steps (default: 200)")
    parser.add_argument("--lr", type=float, default=1e-3, help="(default: 1e-3)")
    parser.add_argument("--batch-size-per-task", type=int, default=16, help="(default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and probe (default: 0)")
    parser.add_argument("--max-test-images", type=int, default=None, help="(default: all)")
    args = parser.parse_args(argv)
    variants = [parse_variant(v, args.steps, args.lr, args.batch_size_per_task, args.seed) for v in
                (args.variant or DEFAULT_VARIANTS)]  # fmt: skip

    from hf_wemoe.adaptation import (
        AdaptationMonitor,
        TrainOptions,
        adapt_routers,
        load_router_state,
        router_state,
    )
    from hf_wemoe.calibration import calibrate_routers
    from hf_wemoe.evaluation import evaluate_tasks
    from hf_wemoe.merging.recipe import MergeRecipe
    from hf_wemoe.toy.build import get_toy_zoo
    from hf_wemoe.toy.manifest import ZooManifest
    from hf_wemoe.utils.progress import quiet_libraries
    from hf_wemoe.workflows.experiment import Adaptation, load_suite, oracle_accuracy
    from hf_wemoe.workflows.merge import run_merge
    from hf_wemoe.workflows.suites import toy_suite
    from hf_wemoe.zeroshot.classifier import ZeroShotClassifier, load_vision_model

    zoo = ZooManifest.load(args.zoo) if args.zoo else get_toy_zoo(args.preset)
    suite = toy_suite(zoo, max_test_images=args.max_test_images)
    with quiet_libraries(False), tempfile.TemporaryDirectory(prefix="hf-wemoe-study-") as scratch:
        projection, tasks = load_suite(suite, progress=False)
        merged = Path(scratch) / args.method
        recipe = MergeRecipe(base=suite.base, experts={t.name: t.expert for t in suite.tasks}, method=args.method)
        run_merge(recipe, merged, overwrite=True, show_progress=False)
        vision, _ = load_vision_model(str(merged))
        classifier = ZeroShotClassifier(vision, projection)
        as_built = router_state(vision)  # every variant starts from the merge as built
        bound = oracle_accuracy(vision, projection, tasks)
        probe_options = TrainOptions(seed=args.seed)
        start = AdaptationMonitor(classifier, tasks, probe_options).measure(0)
        before = evaluate_tasks(classifier, tasks, progress=False).accuracy
        print(f"toy zoo preset {zoo.preset} (seed {zoo.seed}), {args.method}; before = the merge as built (every "
              f"expert at scaling {vision.config.scaling}: task arithmetic)\n")  # fmt: skip
        for calibrate, train in variants:
            label = Adaptation(train=train, calibrate=calibrate).label
            load_router_state(vision, as_built)
            cpu = time.process_time()
            if calibrate:
                calibrate_routers(vision, tasks, seed=args.seed, progress=False)
            if train is not None:
                adapt_routers(classifier, tasks, train, progress=False)
            cpu = time.process_time() - cpu
            end = AdaptationMonitor(classifier, tasks, probe_options).measure(0)
            after = evaluate_tasks(classifier, tasks, progress=False).accuracy
            experts = list(vision.config.expert_names)
            print(f"### {label} (CPU time {cpu:.0f} s)\n")
            print("| task | before | after | own bound | classes predicted, before → after | "
                  "own expert's routing weight, before → after | other experts' mean weight, after |")  # fmt: skip
            print("|---|---:|---:|---:|---:|---:|---:|")
            for task in tasks:
                name = task.name
                s, e = start["tasks"][name], end["tasks"][name]
                own = experts.index(name)
                mark = " (collapsing)" if e["classes"] < 0.5 * s["classes"] else ""
                print(f"| {name} | {before[name]:.1f} | {after[name]:.1f} | {bound[name]:.1f} | "
                      f"{s['classes']:.1f} → {e['classes']:.1f}{mark} | {s['routing'][own]:.2f} → "
                      f"{e['routing'][own]:.2f} | {others(e['routing'], own):.2f} |")  # fmt: skip
            mean = lambda values: sum(values.values()) / len(values)  # noqa: E731
            print(f"| **average** | **{mean(before):.1f}** | **{mean(after):.1f}** | **{mean(bound):.1f}** | | | |\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
