"""Experiment tracking as timm's train.py does it (``--log-wandb``, ``--wandb-project``, ``--wandb-tags``,
``--wandb-resume-id``), through the TensorBoard writer: every scalar the loop logs (each loss term, img/s, teacher
ms, lr, grad norm, the epoch's eval top-1/top-5, teacher agreement and KL) goes to Weights & Biases as well.

* wandb is optional: imported only with ``--log-wandb``; missing, the run stops before anything is written.
* Rank 0 only (the writer exists on rank 0 only). The run's id is kept in ``<run folder>/wandb_run_id.txt``, so a
  ``--resume`` (``auto`` after a preemption) continues the same tracking run (``resume="allow"``) instead of
  opening a new one; ``--wandb-resume-id ID`` continues that run (``resume="must"``, timm's meaning, with
  ``--resume``). The run's config is its settings plus the weight identity lines of its ``args.yaml``
  (``teacher_source``, ``teacher_sha256``, ...).
* The files live in ``<run folder>/wandb/`` (``WANDB_MODE=offline``: ``wandb sync <run folder>/wandb/offline-run-*``).
"""
import logging
import os
from typing import Any, Dict, Optional

import yaml

from .errors import FatalError, short

_logger = logging.getLogger('train')

RUN_ID_FILE = 'wandb_run_id.txt'
TRACKING_KEYS = ('log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id')  # no run setting (resume-free)


def add_tracking_args(parser) -> None:
    """timm train.py's tracking flags, with timm's names, defaults and meaning."""
    group = parser.add_argument_group('Experiment tracking parameters')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log training and validation metrics to wandb (rank 0; every loss term, img/s, eval '
                            'top-1, teacher agreement and KL; needs `pip install wandb`)')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                       help='If resuming a run, the id of the run in wandb (with --resume; default: the id kept in '
                            f'the run folder\'s {RUN_ID_FILE}, so --resume auto continues the same wandb run)')


def check_tracking(args: Any) -> None:
    """Before anything is written: wandb importable when asked for, --wandb-resume-id only with --resume."""
    if not getattr(args, 'log_wandb', False):
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise FatalError(f'--log-wandb needs the wandb package, which cannot be imported ({short(e)}); install it '
                         f'(pip install wandb) or drop --log-wandb') from None
    if args.wandb_resume_id and not args.resume:
        raise FatalError(f'--wandb-resume-id {args.wandb_resume_id} continues a wandb run, so it needs --resume '
                         f'(a checkpoint, or auto); drop --wandb-resume-id to open a new wandb run')


def _config(args: Any, output_dir: str) -> Dict[str, Any]:
    """The run's settings, plus the keys its args.yaml holds beyond them: the weight identity lines."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    config = {k: (v if isinstance(v, plain) else str(v)) for k, v in vars(args).items()}
    try:
        with open(os.path.join(output_dir, 'args.yaml')) as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    if isinstance(saved, dict):
        config.update({k: v for k, v in saved.items() if k not in config})
    return config


def _saved_id(output_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(output_dir, RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def start_wandb(output_dir: str, args: Any):
    """The wandb run of this run folder: ``--wandb-resume-id`` (must exist), else with ``--resume`` the id kept in
    the folder (continued), else a new run; its id is written to the folder."""
    import wandb
    if args.wandb_resume_id:
        run_id, resume = args.wandb_resume_id, 'must'
    elif args.resume and _saved_id(output_dir):
        run_id, resume = _saved_id(output_dir), 'allow'
    else:
        run_id, resume = None, None  # wandb picks the id
    try:
        run = wandb.init(project=args.wandb_project, name=os.path.basename(os.path.normpath(output_dir)),
                         config=_config(args, output_dir), tags=list(args.wandb_tags or []) or None, id=run_id,
                         resume=resume, dir=output_dir, reinit='create_new')
    except Exception as e:  # not logged in, no network, an id that does not exist with resume="must"
        raise FatalError(f'--log-wandb: wandb.init failed ({short(e)}); run `wandb login`, set WANDB_MODE=offline '
                         f'(then `wandb sync`), or drop --log-wandb') from None
    run.define_metric('train/step')
    run.define_metric('train/*', step_metric='train/step')
    run.define_metric('epoch')
    with open(os.path.join(output_dir, RUN_ID_FILE), 'w') as f:
        f.write(run.id + '\n')
    _logger.info(f'wandb run {run.id} ({"continued" if resume else "new"}, mode {run.settings.mode}, '
                 f'files in {os.path.join(output_dir, "wandb")})')
    return run


class TrackedWriter:
    """A TensorBoard SummaryWriter whose scalars also go to a wandb run: ``train/*`` on the ``train/step`` axis
    (updates), every other group (``eval/*``) on the ``epoch`` axis; the scalars of one step are sent as one record. Everything else
    is the SummaryWriter's."""

    def __init__(self, writer, run):
        self.writer, self.run = writer, run
        self._pending, self._at, self._axes = {}, None, {'train'}

    def add_scalar(self, tag: str, value, global_step=None, *a, **kw):
        self.writer.add_scalar(tag, value, global_step, *a, **kw)
        prefix = tag.split('/')[0]
        if prefix not in self._axes:  # any group but train/ (eval/, or one added later) is logged per epoch
            self.run.define_metric(f'{prefix}/*', step_metric='epoch')
            self._axes.add(prefix)
        at = ('train/step' if prefix == 'train' else 'epoch', global_step)
        if at != self._at:
            self._commit()
            self._at = at
        self._pending[tag] = float(value)

    def _commit(self) -> None:
        if self._pending:
            axis, step = self._at
            self.run.log(dict(self._pending, **({axis: step} if step is not None else {})))
        self._pending = {}

    def flush(self) -> None:
        self._commit()
        self.writer.flush()

    def close(self) -> None:
        try:
            self._commit()
        finally:
            self.writer.close()
            self.run.finish()

    def __getattr__(self, name):
        return getattr(self.writer, name)


def tracked(writer, output_dir: str, args: Any = None):
    """``writer`` itself, or with ``--log-wandb`` on rank 0 a TrackedWriter around it."""
    if args is None or not getattr(args, 'log_wandb', False) or getattr(args, 'rank', 0) != 0:
        return writer
    try:
        return TrackedWriter(writer, start_wandb(output_dir, args))
    except BaseException:
        writer.close()
        raise
