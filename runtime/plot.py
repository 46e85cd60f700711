"""curves.png: the story of a run in one picture, drawn from its summary.csv after every epoch.

Six panels against epoch: each training loss term (unweighted), the weighted total (train, and the
eval cross-entropy), student / EMA top-1, top-1 agreement with the teacher, KL(teacher || student)
and the learning rate. matplotlib is imported on first use and drives its Agg canvas directly (no
pyplot, no display, no global backend switch). A picture never stops a run: any failure is a warning.
"""
import csv
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

from .checkpoint import atomic_write

_logger = logging.getLogger('train')

Series = Dict[str, Tuple[List[float], List[float]]]


def _number(text: Optional[str]) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_summary(path: str) -> Series:
    """{column: (epochs, values)} of every numeric column of a summary.csv; empty cells (epochs without
    validation) and unreadable values are left out, rows without an integer epoch are skipped."""
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    series: Series = {}
    for row in rows:
        epoch = _number(row.get('epoch'))
        if epoch is None:
            continue
        for key, text in row.items():
            value = _number(text) if key and key != 'epoch' else None
            if value is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(epoch)
                ys.append(value)
    return series


def _panels(series: Series) -> List[Tuple[str, Sequence[Tuple[str, str]], bool]]:
    """(title, [(column, label)], log y-axis) of each panel that has data."""
    terms = sorted(k for k in series if k.startswith('train_loss_'))

    def having(*cols):
        return [(c, label) for c, label in cols if c in series]

    panels = [
        ('loss terms (unweighted)', [(k, k[len('train_'):]) for k in terms], True),
        ('loss: weighted total (train), cross-entropy (eval)', having(('train_loss', 'train'), ('eval_loss', 'eval')),
         False),
        ('top-1 (%)', having(('eval_top1', 'student'), ('eval_ema_top1', 'EMA')), False),
        ('top-1 agreement with the teacher (%)', having(('eval_agree_top1', 'student'),
                                                        ('eval_ema_agree_top1', 'EMA')), False),
        ('KL(teacher || student), nats', having(('eval_kl_teacher', 'student'), ('eval_ema_kl_teacher', 'EMA')), False),
        ('learning rate', having(('lr', 'lr'),), False),
    ]
    return [p for p in panels if p[1]]


def draw_curves(series: Series, title: str = ''):
    """A matplotlib Figure of the panels (Agg canvas attached), or None when there is nothing to draw."""
    panels = _panels(series)
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(5 * cols, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, lines, log_y) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for col, label in lines:
            xs, ys = series[col]
            ax.plot(xs, ys, marker='o' if len(xs) < 30 else None, markersize=3, label=label)
        values = [v for col, _ in lines for v in series[col][1]]
        if log_y and min(values) > 0 and max(values) > 20 * min(values):  # terms of very different sizes
            ax.set_yscale('log')
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def write_curves(summary_path: str, out_path: str, title: str = '') -> bool:
    """Draw ``summary_path`` into ``out_path`` (PNG, written atomically). True when written; a failure (no
    matplotlib, an odd csv, a full disk) is logged as a warning and returns False."""
    try:
        fig = draw_curves(read_summary(summary_path), title)
        if fig is None:
            return False
        atomic_write(out_path, lambda f: fig.savefig(f, format='png'))
        return True
    except Exception as e:  # noqa: BLE001  never stop a run for a picture
        _logger.warning(f"could not draw '{out_path}' ({type(e).__name__}: {str(e)[:200]}); training goes on "
                        f"(--no-plot turns the picture off)")
        return False
