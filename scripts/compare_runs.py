"""Compare finished train.py runs that differ from a baseline run in one setting each: a JSON file and a table.

    python scripts/compare_runs.py baseline=/tmp/proxies/ema dropout=/tmp/proxies/dropout ... \
        --out results/2026-12-02-cpu-proxies --title "..." --conditions "..."
    python scripts/compare_runs.py --previous results/2026-12-02-cpu-proxies.json cutout=/tmp/proxies/cutout \
        --out results/2026-12-02-cpu-proxies

Each NAME=RUN_DIR is a train.py output folder (config.json, metrics.jsonl, summary.json); the first is the baseline
(without --previous).
For each run it writes what its config changes against the baseline's, the test accuracy and training seconds at
every evaluation (with train.ema_decay also the training weights' own accuracy), the final figures (with the
test-time views' accuracies) and, when the
file RUN_DIR.load exists (lines "<time> <1-min> <5-min> <15-min> load average", one a minute, as the proxy runs
sampled it), the mean 1-minute load average while it ran: what else the machine was doing. OUT.json holds it all,
with the baseline's config, OUT.md the table.

--previous FILE.json adds runs to an earlier comparison whose run folders may be gone (they live outside the
repository, on a machine a later session may not have): its rows stay as written, and each new run's changes are
against the baseline_config it stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpu_check import training_result  # scripts/ is on sys.path: this script's own folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distcifar.config import config_from_dict, flatten  # noqa: E402


def changes(config: dict, baseline: dict) -> dict:
    """The config fields of a run that differ from the baseline's (output_dir apart), as {field: value}. A field
    that one run's config.json lacks (a run older than the field) counts at its default, which that run used."""
    mine, theirs = (flatten(config_from_dict(tree).to_dict()) for tree in (config, baseline))
    return {
        key: mine.get(key)
        for key in sorted(set(mine) | set(theirs))
        if key != "output_dir" and mine.get(key) != theirs.get(key)
    }


def mean_load(run_dir: Path) -> float | None:
    """The mean 1-minute load average sampled in RUN_DIR.load while the run trained, or None without samples."""
    samples = Path(f"{run_dir}.load")
    if not samples.is_file():
        return None
    values = [float(line.split()[1]) for line in samples.read_text().splitlines() if len(line.split()) >= 2]
    return round(sum(values) / len(values), 2) if values else None


def compare(runs: dict[str, Path], baseline: dict) -> list[dict]:
    """One row per run: its name, its changes against the baseline config, its evaluations and its final figures."""
    configs = {name: json.loads((path / "config.json").read_text()) for name, path in runs.items()}
    rows = []
    for name, path in runs.items():
        result = training_result(path)
        if not result["finished"]:
            raise SystemExit(f"error: {path} has no summary.json: the run has not finished")
        rows.append(
            {
                "name": name,
                "run_dir": str(path),
                "changes": changes(configs[name], baseline),
                **{k: result[k] for k in ("test_accuracy", "test_accuracy_hflip", "test_accuracy_hflip_translate")},
                **{k: result[k] for k in ("test_accuracy_raw", "train_seconds", "images_per_second")},
                "mixed_precision": result["mixed_precision"],
                "eval_samples": result["eval_samples"],
                "mean_load_1min": mean_load(path),
                "epochs": result["epochs"],
            }
        )
    return rows


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def table(rows: list[dict]) -> str:
    """The markdown table: one line per run, the accuracy at each evaluated epoch (columns: every epoch some run
    evaluated at), then the final figures."""
    epochs = sorted({round(e["epoch"], 3) for row in rows for e in row["epochs"]})
    lines = [
        "| run | change against the baseline | "
        + " | ".join(f"ep {epoch:g}" for epoch in epochs)
        + " | final | mirror | mirror + shifts | without EMA | train s | load |",
        "|---|---|" + "---|" * len(epochs) + "---|---|---|---|---|---|",
    ]
    for row in rows:
        change = ", ".join(f"`{k}` {v}" for k, v in row["changes"].items()) or "(the baseline)"
        at = {round(e["epoch"], 3): e["test_accuracy"] for e in row["epochs"]}
        load = row["mean_load_1min"]
        lines.append(
            f"| {row['name']} | {change} | "
            + " | ".join(percent(at.get(epoch)) for epoch in epochs)
            + f" | **{percent(row['test_accuracy'])}** | {percent(row['test_accuracy_hflip'])} | "
            f"{percent(row['test_accuracy_hflip_translate'])} | {percent(row['test_accuracy_raw'])} | "
            f"{row['train_seconds']:.0f} | {'' if load is None else load} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR, the baseline first (without --previous)")
    parser.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--title", help="what was compared, on what (the table's heading); default: --previous's")
    parser.add_argument("--conditions", help="the machine, what else ran, anything a reader must know")
    parser.add_argument("--previous", help="an earlier OUT.json whose rows come first, its baseline the baseline")
    args = parser.parse_args()
    try:
        previous = json.loads(Path(args.previous).read_text()) if args.previous else {}
    except (OSError, ValueError) as err:
        parser.error(f"--previous {args.previous}: not a comparison JSON this script wrote ({err})")
    if args.previous and "baseline_config" not in previous:
        parser.error(f"--previous {args.previous}: it has no baseline_config (written before it was stored)")
    title, conditions = args.title or previous.get("title"), args.conditions or previous.get("conditions", "")
    if not title:
        parser.error("--title is required without --previous")
    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path or not (Path(path) / "config.json").is_file():
            parser.error(f"{item}: give NAME=RUN_DIR, a train.py output folder with config.json")
        runs[name] = Path(path)
    baseline = previous.get("baseline_config") or json.loads((next(iter(runs.values())) / "config.json").read_text())
    rows = previous.get("runs", []) + compare(runs, baseline)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"title": title, "conditions": conditions, "baseline_config": baseline, "runs": rows}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = f"# {title}\n\n{conditions}\n\nTest accuracy (%) after each evaluation:\n\n{table(rows)}\n"
    Path(f"{out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
