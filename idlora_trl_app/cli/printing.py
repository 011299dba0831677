"""What the training commands print: on the main process only, one line per logging step (in place of the Trainer's
own printer and progress bar), the loss trend and the elapsed time."""

from __future__ import annotations

import time

from .distributed import is_main_process


def say(*parts, **kwargs) -> None:
    """`print` on the main process only (every rank of a distributed run executes the same commands)."""
    if is_main_process():
        print(*parts, flush=True, **kwargs)


def seconds(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


def log_callback(total_steps: int, keys: tuple[str, ...]):
    from transformers import TrainerCallback

    class PrintLogs(TrainerCallback):
        """One line per logging step: the step, the loss and a few metrics, the elapsed time."""

        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "eval_loss" in logs:  # --eval_strategy: the loss on the held-out rows
                print(f"  step {state.global_step:>4}/{total_steps}  eval loss {logs['eval_loss']:.4f}", flush=True)
            if "loss" not in logs:
                return
            parts = [f"step {state.global_step:>4}/{total_steps}", f"loss {logs['loss']:.4f}"]
            parts += [f"{key.split('/')[-1] if '/' in key else key} {logs[key]:.3f}" for key in keys if key in logs]
            parts.append(f"lr {logs.get('learning_rate', 0):.1e}")
            print("  " + "  ".join(parts) + f"  ({time.perf_counter() - self.start:.0f} s)", flush=True)

    return PrintLogs()


def use_our_printer(trainer, callback) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(callback)


def loss_trend(trainer) -> str:
    """'1.4774 (step 1) -> 0.4123 (steps 26-30)': each logged loss is the mean since the previous log."""
    logs = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log and "step" in log]
    if not logs:
        return "not logged"
    (s0, l0), (s1, l1) = logs[0], logs[-1]
    previous = logs[-2][0] if len(logs) > 1 else 0
    window = f"step {s1}" if s1 - previous <= 1 else f"steps {previous + 1}-{s1}"
    return f"{l0:.4f} (step {s0}) -> {l1:.4f} ({window})"
