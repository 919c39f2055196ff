"""Experiment tracking: W&B or TensorBoard through Accelerate, plus files in the output folder.

Only the main process tracks; on other ranks every Tracker method returns at once. Every logged
row carries the optimizer step as `step`, and its metrics are named `train/...`, `eval/...`,
`experts/...` or `system/...`, the same in metrics.jsonl, W&B and TensorBoard. Whatever
the tracker (also none), the main process appends each logged row to OUTPUT_DIR/metrics.jsonl, a line to
OUTPUT_DIR/attempts.jsonl as each attempt of a training run starts and one as it ends,
keeps the latest confusion matrix in OUTPUT_DIR/confusion.json and, with tracking.plots,
redraws OUTPUT_DIR/curves.png and confusion.png after each evaluation (in a background
process running `python -m distcifar.plot`) and in finish() if rows came after that.
"""

from __future__ import annotations

import datetime
import json
import math
import netrc
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from distcifar import plot
from distcifar.config import Config, TrackingConfig, flatten
from distcifar.data import CLASSES, normalize
from distcifar.errors import one_line
from distcifar.files import append_jsonl, read_jsonl, remove_stale_temporaries, write_atomically
from distcifar.model import uncompiled

WANDB_HINT = "run `wandb login`, or set WANDB_API_KEY, or set WANDB_MODE=offline (and `wandb sync` later)"
STEP_KEY = "step"  # the global optimizer step, in every logged row: the x axis of every W&B chart
RUN_ID_FILE = "tracker_run_id"  # in OUTPUT_DIR: the W&B run id, written at start, before any checkpoint holds it
# in OUTPUT_DIR: a line as each attempt of a training run starts (its number, time, first step, commit) and one as
# it ends (time, step, exit code); an attempt killed outright, or ended by an error, has no end line. A run resumed
# across sessions, restarted by torchrun or requeued by Slurm thus says how many attempts it took and where each
# began and stopped.
ATTEMPTS_FILE = "attempts.jsonl"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    netrc_path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def report_to(cfg: TrackingConfig) -> str:
    """'wandb' | 'tensorboard' | 'none'; 'auto' picks W&B when WANDB_MODE or W&B credentials are set."""
    if cfg.report_to != "auto":
        return cfg.report_to
    return "wandb" if os.environ.get("WANDB_MODE") or _has_wandb_credentials() else "none"


def _new_run_id() -> str:
    # The same shape as wandb.util.generate_id(), without importing wandb.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def git_commit() -> str | None:
    """The commit of the distcifar checkout running, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_run_id(path: Path) -> str | None:
    try:
        run_id = path.read_text().strip()
    except OSError:
        return None
    return run_id if run_id and all(c.isalnum() or c in "-_" for c in run_id) else None


def _write_run_id(path: Path, run_id: str) -> None:
    write_atomically(path, run_id + "\n")  # a kill mid-write leaves the old file whole


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step`, where a continuing run starts: the rows after it come from an
    attempt that died before its next checkpoint, and this run logs those steps again (bit-identical on CPU), so
    the file holds each step once. A line cut off by a kill is dropped too."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get(STEP_KEY), int) and row[STEP_KEY] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomically(path, "".join(line + "\n" for line in kept))


def _set_aside(path: Path) -> None:
    """A new run (--resume never, --checkpoint.weights_only) in a folder an earlier run logged to: its rows are
    kept, renamed to metrics.1.jsonl (the first free number), and this run's start a file of their own, so that
    curves.png and scripts read one run, not two interleaved."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    number = 1
    while (kept := path.with_name(f"{path.stem}.{number}{path.suffix}")).exists():
        number += 1
    os.replace(path, kept)
    print(f"[tracking] a new run: the earlier run's {path.name} is kept as {kept}", file=sys.stderr, flush=True)


def class_names(num_classes: int) -> list[str]:
    return list(CLASSES) if num_classes == len(CLASSES) else [f"class{i}" for i in range(num_classes)]


class Tracker:
    def __init__(
        self,
        accelerator,
        cfg: Config,
        output_dir: Path,
        run_id: str | None,
        hardware: dict,
        start_step: int | None = None,
    ):
        """`start_step`: the step this run starts from (train.py); metrics.jsonl rows after it are dropped when the
        run continues the folder's run (see _drop_rows_after). None: the file is left as it is."""
        self.accelerator = accelerator
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.report_to = report_to(cfg.tracking)
        self.is_main = accelerator.is_main_process
        self.run_id = self._pick_run_id(run_id)
        self.git_commit = git_commit()  # at the start: the code that runs, whatever is committed while it does
        self._wandb_run = None  # the wandb Run while W&B is on
        self._plotter: subprocess.Popen | None = None  # the background redraw of the PNGs
        self._plots_outdated = False  # rows were logged after the last redraw started
        self._finished = False
        self._attempt: int | None = None  # this attempt's number in attempts.jsonl (a training run's main process)
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.output_dir)  # a plot or metrics file cut off by a kill
        if start_step is not None:  # a new run keeps an earlier run's rows beside its own files
            if self._continues():
                _drop_rows_after(self.output_dir / plot.METRICS_FILE, start_step)
            else:
                _set_aside(self.output_dir / plot.METRICS_FILE)
                _set_aside(self.output_dir / ATTEMPTS_FILE)
            self._attempt = self._start_attempt(start_step)
        self._metrics_file = open(self.output_dir / plot.METRICS_FILE, "a")  # noqa: SIM115 - open for the run's life
        if self.report_to != "none":
            self._start(hardware)

    def _pick_run_id(self, checkpoint_id: str | None) -> str:
        """The id of the checkpoint this run resumed from (train.py stores it in every checkpoint), else
        the id an earlier attempt in OUTPUT_DIR chose (OUTPUT_DIR/tracker_run_id; a run killed before
        its first checkpoint thus continues its W&B run, unless --resume never or
        --checkpoint.weights_only start a new run), else WANDB_RUN_ID, else a new id.

        The folder's id beats WANDB_RUN_ID as the checkpoint's does: both mean this run continues one.
        With W&B on, the main process writes the choice to OUTPUT_DIR/tracker_run_id at once; only
        the main process's id is used.
        """
        env_id = os.environ.get("WANDB_RUN_ID")
        if not self.is_main:
            return checkpoint_id or env_id or _new_run_id()
        path = self.output_dir / RUN_ID_FILE
        folder_id = _read_run_id(path) if self._continues() and not checkpoint_id else None
        run_id = checkpoint_id or folder_id or env_id or _new_run_id()
        if self.report_to == "wandb":
            if env_id and env_id != run_id:
                print(
                    f"[tracking] continuing W&B run {run_id} of {self.output_dir}; WANDB_RUN_ID={env_id} is not "
                    "used (--resume never starts a new run)",
                    file=sys.stderr,
                    flush=True,
                )
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_run_id(path, run_id)
        return run_id

    def _start_attempt(self, step: int) -> int:
        """Append this attempt's start to attempts.jsonl; its number (1 for the run's first)."""
        path = self.output_dir / ATTEMPTS_FILE
        number = 1 + sum("started" in row for row in read_jsonl(path))
        start = {"started": _now(), "from_step": step, "git_commit": self.git_commit}
        append_jsonl(path, {"attempt": number, **start, "processes": self.accelerator.num_processes})
        return number

    def _continues(self) -> bool:
        """This run continues the folder's run (a resume, or a restart before the first checkpoint)."""
        return self.cfg.resume != "never" and not self.cfg.checkpoint.weights_only

    def _start(self, hardware: dict) -> None:
        tracking = self.cfg.tracking
        run_config = {**flatten(self.cfg.to_dict()), **hardware, "git_commit": self.git_commit}
        if self.report_to == "tensorboard":  # add_hparams takes only numbers, strings and bools
            run_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_config.items()}
        # Only what the config sets goes to wandb.init: init arguments beat the environment, so the
        # standard WANDB_* variables (project, entity, name, group, tags, dir, resume) must stay free.
        wandb_kwargs = {"id": self.run_id}
        if not os.environ.get("WANDB_RESUME"):
            wandb_kwargs["resume"] = "allow"
        if not os.environ.get("WANDB_DIR"):
            wandb_kwargs["dir"] = str(self.output_dir)
        for key, value in (
            ("name", tracking.run_name),
            ("entity", tracking.entity),
            ("group", tracking.group),
            ("tags", tracking.tags),
        ):
            if value:  # an empty tag list on a resume would also wipe tags added in the W&B UI
                wandb_kwargs[key] = value
        project = tracking.project or os.environ.get("WANDB_PROJECT") or "distcifar"
        try:
            self.accelerator.init_trackers(project, config=run_config, init_kwargs={"wandb": wandb_kwargs})
            if self.report_to not in [tracker.name for tracker in self.accelerator.trackers]:
                raise RuntimeError(
                    f"the Accelerator was built without log_with=['{self.report_to}'] or it is not installed"
                )
        except Exception as err:  # never let tracking stop training
            # Accelerate registers a tracker before starting it; drop the one that failed.
            self.accelerator.trackers.clear()
            reason = one_line(err, 200) or type(err).__name__
            hint = f" To use W&B: {WANDB_HINT}." if self.report_to == "wandb" else ""
            print(
                f"[tracking] {self.report_to} is off ({reason}); metrics still go to "
                f"{self.output_dir / plot.METRICS_FILE}.{hint}",
                file=sys.stderr,
                flush=True,
            )
            self.report_to = "none"
            return
        if self.report_to == "wandb":
            self._wandb_run = self.accelerator.get_tracker("wandb", unwrap=True)
            # Charts against the optimizer step; the run table shows the best eval accuracy and loss.
            self._wandb_run.define_metric(STEP_KEY)
            self._wandb_run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
            self._wandb_run.define_metric("eval/accuracy", step_metric=STEP_KEY, summary="max")
            self._wandb_run.define_metric("eval/loss", step_metric=STEP_KEY, summary="min")

    def log(self, metrics: dict, step: int) -> None:
        """Log plain numbers/strings at the global optimizer step (W&B drops steps that go backwards)."""
        if not self.is_main or self._finished:
            return
        # JSON has no NaN or infinity: such a value (a diverged loss, say) is written as null
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self._metrics_file.write(json.dumps({STEP_KEY: step, **row}) + "\n")
        self._metrics_file.flush()
        self._plots_outdated = True
        # TensorBoard keeps the step as each scalar's own step; W&B charts against the `step` metric
        self.accelerator.log({STEP_KEY: step, **metrics} if self._wandb_run is not None else metrics, step=step)

    def log_eval(
        self, result: dict, step: int, model, sample_images: torch.Tensor, sample_labels: torch.Tensor
    ) -> None:
        """Log an evaluation; `model` is the unwrapped network (a forward on one DDP rank would hang)."""
        if not self.is_main or self._finished:
            return
        names = class_names(len(result["per_class_accuracy"]))
        predictions, expert_weights = _predict(model, sample_images)

        scalars = {
            "train/epoch": result["epoch"],
            "train/seconds": result["train_seconds"],
            "eval/accuracy": result["eval_accuracy"],
            "eval/loss": result["eval_loss"],
            "eval/num_samples": result["eval_samples"],
        }
        if "raw_accuracy" in result:  # train.ema_decay: the training weights' own, beside the average's above
            scalars["eval/raw_accuracy"], scalars["eval/raw_loss"] = result["raw_accuracy"], result["raw_loss"]
        for name, accuracy in zip(names, result["per_class_accuracy"]):
            scalars[f"eval/class_acc/{name}"] = accuracy
        for block, weights in enumerate(expert_weights):
            for conv, mean_weight in enumerate(weights.mean(0).tolist()):
                scalars[f"experts/block{block}/conv{conv}"] = mean_weight
        self.log(scalars, step)

        if self._wandb_run is not None:
            media = _wandb_media(result, names, predictions, sample_images, sample_labels, expert_weights)
            self._wandb_run.log(media, step=step)

        plot.write_confusion(self.output_dir, result["confusion"], names, step, result["epoch"], result["eval_split"])
        if self.cfg.tracking.plots:
            self._redraw_in_background()

    def _redraw_in_background(self) -> None:
        # Drawing takes about a second of CPU; in its own process it holds up neither this loop nor its GIL.
        if self._plotter is not None and self._plotter.poll() is None:
            return  # still drawing an earlier evaluation; finish() draws the final state
        package_parent = str(Path(plot.__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
        self._plotter = subprocess.Popen(
            [sys.executable, "-m", "distcifar.plot", str(self.output_dir)],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": python_path},
        )
        self._plots_outdated = False

    def finish(self, summary: dict | None = None, exit_code: int = 0, step: int | None = None) -> None:
        """End the tracker runs; a non-zero exit_code marks the W&B run as failed; a training run's attempt ends in
        attempts.jsonl at `step` (the step it saved at, when a signal stopped it). Safe to call twice.

        Unlike accelerator.end_training() this leaves the process group alone, so a main-only call
        cannot break the other ranks; train.py still calls end_training() on every rank at the end.
        """
        if not self.is_main or self._finished:
            return
        self._finished = True
        if self._attempt is not None:
            ended = {"ended": _now(), "at_step": step, "exit_code": exit_code}
            append_jsonl(self.output_dir / ATTEMPTS_FILE, {"attempt": self._attempt, **ended})
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                if summary:
                    self._wandb_run.summary.update(summary)
                self._wandb_run.finish(exit_code=exit_code)
            else:
                tracker.finish()
        self.accelerator.trackers.clear()  # so a later end_training() does not finish them again
        self._metrics_file.close()
        if self._plotter is not None:
            self._plotter.wait()
        if self.cfg.tracking.plots and self._plots_outdated:
            plot.redraw(self.output_dir)


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Predicted classes of `images` (uint8, CPU) and each block's expert weights, both on the CPU."""
    module = uncompiled(model)
    was_training = module.training
    device = next(module.parameters()).device
    module.eval()
    try:
        logits = module(normalize(images.to(device)))
    finally:
        module.train(was_training)
    return logits.argmax(1).cpu(), [weights.float().cpu() for weights in module.expert_weights()]


def _wandb_media(
    result: dict,
    names: list[str],
    predictions: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    expert_weights: list[torch.Tensor],
) -> dict:
    import wandb

    # The table and chart spec wandb.plot.confusion_matrix builds, filled from counts rather than raw labels.
    table = wandb.Table(
        columns=["Actual", "Predicted", "nPredictions"],
        data=[
            [names[true], names[predicted], count]
            for true, row in enumerate(result["confusion"])
            for predicted, count in enumerate(row)
        ],
    )
    chart = wandb.plot_table(
        "wandb/confusion_matrix/v1",
        table,
        {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        {"title": f"Confusion matrix ({result['eval_split']}, epoch {result['epoch']:g})"},
    )
    samples = [
        wandb.Image(image.permute(1, 2, 0).numpy(), caption=f"pred: {names[predicted]} / true: {names[true]}")
        for image, predicted, true in zip(images.cpu(), predictions.tolist(), labels.tolist())
    ]
    media = {"eval/confusion_matrix": chart, "eval/samples": samples}
    for block, weights in enumerate(expert_weights):
        media[f"experts/block{block}/weights"] = wandb.Histogram(weights.flatten().numpy())
    return media
