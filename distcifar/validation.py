"""The run's evaluations: each one run, logged and printed; the best accuracy so far and the time to
train.stop_at_accuracy (its part of a checkpoint); and the final model's test-time-augmented accuracies."""

from __future__ import annotations

from distcifar.config import Config
from distcifar.data import Split
from distcifar.engine import Progress, Training, evaluate
from distcifar.model import memory_format
from distcifar.ranks import max_over_ranks, print_once, take_main_process_buffers


class Validator:
    def __init__(self, accelerator, cfg: Config, training: Training, tracker, sample: Split, eval_name: str):
        self.accelerator, self.cfg, self.training, self.tracker = accelerator, cfg, training, tracker
        self.sample, self.eval_name = sample, eval_name  # a few images the tracker shows with predictions
        self.best_accuracy: float | None = None
        self.target_accuracy: float | None = None  # the train.stop_at_accuracy the two fields below are of
        self.target_step: int | None = None  # the step whose evaluation first reached it
        self.target_train_seconds: float | None = None  # the training seconds then: the run's own time to the target

    def state_dict(self) -> dict:
        return {
            "best_accuracy": self.best_accuracy,
            "target_accuracy": self.target_accuracy,
            "target_step": self.target_step,
            "target_train_seconds": self.target_train_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_dict():
            setattr(self, key, state.get(key))

    def should_validate(self, step: int) -> bool:
        return self.training.cadence.evaluates(step)

    def evaluate(self, hflip: bool | None = None, translate: bool | None = None) -> dict:
        """Evaluate the run's model (the weight average with train.ema_decay, and then the training weights too),
        with the configured test-time views unless given. Collective."""
        accelerator, training, train_cfg = self.accelerator, self.training, self.cfg.train
        hflip = train_cfg.eval_hflip if hflip is None else hflip
        translate = train_cfg.eval_translate if translate is None else translate

        def on(model) -> dict:
            layout = memory_format(train_cfg.channels_last)
            num_classes = self.cfg.model.num_classes
            loader = training.eval_loader
            return evaluate(
                accelerator, model, loader, num_classes=num_classes, hflip=hflip, translate=translate, layout=layout
            )

        if training.ema is not None:  # every rank evaluates the main process's averaged statistics
            take_main_process_buffers(accelerator, training.ema.module)
        result = on(training.evaluated_model)
        if training.ema is not None:
            raw = on(training.model)
            result.update(raw_accuracy=raw["eval_accuracy"], raw_loss=raw["eval_loss"])
        result["eval_split"] = self.eval_name
        return result

    def validate(self, progress: Progress, peak_memory_gb: float | None = None) -> dict:
        """The evaluation due at this step: run, kept as the best if it is, logged and printed."""
        result = self.evaluate()
        result.update(epoch=progress.step / self.training.batches.steps_per_epoch, train_seconds=progress.train_seconds)
        self.best_accuracy = max(self.best_accuracy or 0.0, result["eval_accuracy"])
        model = self.accelerator.unwrap_model(self.training.evaluated_model, keep_torch_compile=False)
        self.tracker.log_eval(
            result, step=progress.step, model=model, sample_images=self.sample.images, sample_labels=self.sample.labels
        )
        beside = (
            f" (training weights without the average: {result['raw_accuracy']:.4f}, loss {result['raw_loss']:.4f})"
            if "raw_accuracy" in result
            else ""
        )
        memory = f" | peak memory {peak_memory_gb:.2f} GB" if peak_memory_gb is not None else ""
        print_once(
            f"epoch {result['epoch']:g}: {self.eval_name} accuracy {result['eval_accuracy']:.4f}, "
            f"loss {result['eval_loss']:.4f}{beside}{memory}"
        )
        return result

    def reached_target(self, result: dict, progress: Progress) -> bool:
        """Whether this evaluation reached train.stop_at_accuracy, agreed by every rank (one all-reduce per evaluation,
        with a target only). The first one that does is recorded: the run's own time to the target."""
        target = self.cfg.train.stop_at_accuracy
        if not target:
            return False
        reached = bool(max_over_ranks(self.accelerator, result["eval_accuracy"] >= target)[0])
        if reached and self.target_accuracy != target:  # the first evaluation to reach this target
            self.target_accuracy, self.target_step = target, progress.step
            self.target_train_seconds = progress.train_seconds
            print_once(
                f"reached train.stop_at_accuracy {target:.2%} at epoch {result['epoch']:g} (step {progress.step}, "
                f"{progress.train_seconds:.0f} s of training): stopping"
            )
        return reached

    def target_reached_before(self) -> bool:
        """A resumed run whose evaluations already reached train.stop_at_accuracy: it trains no further."""
        target = self.cfg.train.stop_at_accuracy
        reached = bool(target) and (self.best_accuracy or 0.0) >= target
        if reached:
            print_once(f"this run already reached train.stop_at_accuracy {target:.2%} (best {self.best_accuracy:.4f})")
        return reached

    def test_time_accuracies(self) -> dict:
        """The final model's accuracy with the mirror as a second view, and with each view also shifted one pixel
        both ways (six views): reported beside the plain accuracy, never in its place (None without
        train.final_views). Collective."""
        if not self.cfg.train.final_views:
            return {"test_accuracy_hflip": None, "test_accuracy_hflip_translate": None}
        return {
            "test_accuracy_hflip": self.evaluate(hflip=True, translate=False)["eval_accuracy"],
            "test_accuracy_hflip_translate": self.evaluate(hflip=True, translate=True)["eval_accuracy"],
        }

    def summary(self, result: dict) -> dict:
        """summary.json's fields of the weight average and the target: with train.ema_decay the training weights'
        accuracy beside the average's; with train.stop_at_accuracy whether the run reached it and, measured by the
        run itself, after how many training seconds (no evaluations, no saves), steps and epochs (null when it
        never did, or did before this target was set: its checkpoints then record no time to it)."""
        fields = {}
        if "raw_accuracy" in result:
            fields.update(
                ema_decay=self.cfg.train.ema_decay,
                test_accuracy_raw=result["raw_accuracy"],
                test_loss_raw=result["raw_loss"],
            )
        target = self.cfg.train.stop_at_accuracy
        if target:
            timed = self.target_accuracy == target
            fields.update(
                stop_at_accuracy=target,
                target_reached=(self.best_accuracy or 0.0) >= target,
                seconds_to_target=self.target_train_seconds if timed else None,
                steps_to_target=self.target_step if timed else None,
                epochs_to_target=self.target_step / self.training.batches.steps_per_epoch if timed else None,
            )
        return fields
