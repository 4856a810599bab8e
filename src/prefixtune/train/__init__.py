"""Training: one step function for every case, the loop, checkpoints, several tasks, several processes.

loop.py         `train` and its `Trainer` (setup / train / save_checkpoint)
optim.py        AdamW with one parameter group per task, its schedule, gradient clipping
step.py         one optimizer step's forwards and backwards: one task or several, one process or several
tasks.py        which examples each task trains on; each task's place in the loop; mixed batches
classify.py     what `--task classify` changes in a run (the model it loads, what a head can train)
checkpoint.py   checkpoints: trainable tensors + optimizer/schedule/RNG/step, swapped in whole
distributed.py  several processes (torchrun, accelerate launch): the runtime of this process
run_dir.py      the run directory: resume checks, metrics.jsonl, loss.png
"""

from .loop import Interrupted, Trainer, TrainResult, train
from .optim import schedule
from .run_dir import plot_losses, read_metrics

__all__ = ["Interrupted", "TrainResult", "Trainer", "plot_losses", "read_metrics", "schedule", "train"]
