"""What keeps a long run alive, one concern a file; import from the file (``from runtime.saver import RunSaver``).

* ``errors``: ``FatalError`` (one clear message, exit code 2), ``EXIT_PREEMPTED`` (75), start-up error logging.
* ``checkpoint``: checkpoint I/O: the one atomic writer, the one weights-only reader, the strict loader
  with its mismatch report, the output-folder check.
* ``saver``: ``RunSaver``, timm's CheckpointSaver writing through the atomic writer, with exact-resume state.
* ``rng``: RNG states of every stream and rank, in a form a weights-only checkpoint holds.
* ``resume``: ``--resume auto``, the settings check, the position inside an epoch (skip + RNG replay).
* ``runlock``: one run per run folder (a new run refuses a folder holding one), one job per run folder
  (``run.lock``: heartbeat, stale locks taken over).
* ``lockholder``: who holds a run lock (host, boot, pid namespace) and whether its process still runs here.
* ``signals``: SIGTERM / SIGUSR1 / SIGINT -> finish the step, save a recovery checkpoint, exit 75.
* ``distributed``: a timeout for every collective, one line when a peer rank died.
* ``data``: data-folder checks and ``BadImageGuard`` (unreadable images skipped, named and counted).
* ``preflight``: bad input refused before step 0 (one message, exit 2): ``flag_domains`` (numeric flags),
  ``splits`` (the data splits), output paths, names, model input sizes.
* ``nonfinite``: ``NonFiniteGuard`` (abort naming the term, or skip the update); ``norm_and_clip``, the one
  gradient norm of an update (non-finite check, ``--clip-grad``, the log line).
* ``device``: what the machine can run, checked before step 0: bf16, a working ``torch.compile``; fused
  optimizer steps on CUDA; the code version.
* ``metrics``: loss-term sums over ranks, step timing, the console line + TensorBoard, ETA.

Imports run one way: ``errors`` <- ``checkpoint`` <- ``saver``, ``resume`` (<- ``rng``); ``runlock`` also
uses ``lockholder``; no file here
imports ``distillers/``, ``models/``, ``config.py`` or a script.
"""
