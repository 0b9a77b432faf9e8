"""The training stack of the neural models (SCALE, scMVP): data streamed from the store,
DDP launch, checkpoints and the training loop.

* :mod:`.data` - :class:`StoreRows` reads row chunks (:class:`JointRows`: several modalities side by side); :class:`ShardedStream` plans epochs
  (disjoint chunk shards per rank, seeded shuffles, sparse batches densified on the device).
* :mod:`.dist` - :class:`DistEnv` (torchrun / SLURM / single), :func:`launch` (local ranks).
* :mod:`.checkpoint` - atomic checkpoints and resume.
* :mod:`.runs` - :func:`run_ranks` (here, local ranks or torchrun/srun), the hand-off folder
  and the resume rules every model shares.
* :mod:`.trainer` - :func:`fit`, the loop: Adam, clipping, early stopping, bf16 on GPU.
* :mod:`.alloc` - :func:`retain_freed_memory`: freed step buffers stay in the heap (glibc).
* :mod:`.progress` - the progress line: steps, cells/s, ETA to the early-stopping floor and
  to ``max_iter``.
"""

from . import runs
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import JointRows, ShardedStream, SparseBatch, StoreRows
from .dist import DistEnv, cleanup, init_process_group, launch
from .runs import handoff_folder, resolve_resume, resume_mode, run_ranks
from .trainer import TrainConfig, fit, step_generator

__all__ = ["StoreRows", "JointRows", "ShardedStream", "SparseBatch", "DistEnv", "init_process_group", "launch", "cleanup",
           "TrainConfig", "fit", "step_generator", "runs", "run_ranks", "handoff_folder", "resume_mode",
           "resolve_resume", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]
