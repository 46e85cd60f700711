"""ScaleKD as a timm TrainingTask: CAP + DFM + TPP + logit KD (ScaleKD paper, Fan et al., NeurIPS 2024, Sec. 3, Fig. 1).

One step, for views v in {a (direct), b (alternative, mean-removed)}:

    z_t, T4      = teacher(x)                         no grad; T4 = final pre-pool map, NCHW
    z_s, S3, S4  = student(x)                         one forward_intermediates pass
    P3_v         = CAP3_v(S3)                         learned queries, teacher stage-3 grid/width
    R3_v         = teacher_tail(P3_v)                 frozen weights, gradients flow (TPP)
    P4_v         = CAP4_v(S4, queries=R3_v)           input-dependent queries, not detached
    loss = (1-w) L_cls + w L_kd + a3[0] D(R3_a,T4) + a3[1] D_alt(R3_b,T4)
                                + a4[0] D(P4_a,T4) + a4[1] D_alt(P4_b,T4)

The trainable module holds the student and the four projectors, so DDP and the EMA wrap exactly
the trained parameters; the teacher stays outside both. The student stays a plain timm model:
checkpoints store it as ``state_dict`` and the projectors as ``task_state``.
"""
import logging
from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.utils import unwrap_model

from models.features import StudentTaps, forward_student, forward_teacher, resolve_student_taps
from models.tails import TeacherTail
from runtime.errors import FatalError
from .base import DistillTask, kd_loss
from .cap import CrossAttentionProjector
from .dfm import NORMS as DFM_NORMS, feature_distance
from .tpp import perceive

VIEWS = ('a', 'b')  # a: direct view, b: alternative (DC-removed) view


def constant_terms(geometry: Dict[str, Tuple[int, int]], alpha: Dict[str, Sequence[float]]) -> Dict[str, str]:
    """Alternative-view terms that are constant by construction (they can teach nothing), with the reason.

    A projector whose student map has one position attends over a single key, so its output is the
    same at every query position; a stage-4 projector fed constant queries (a constant stage-3 path)
    is constant too, and the teacher tail maps a constant map to a constant map. The mean-removed
    view of a constant map is zero: its term is a constant with no gradient. A teacher map with one
    position makes both alternative views zero on the teacher side.
    """
    single = {k: geometry[k][0] * geometry[k][1] == 1 for k in ('student_s3', 'student_s4', 'teacher_s4')}
    reasons = {}
    for stage in ('s3', 's4'):
        if not alpha[stage][1]:
            continue
        term = f'loss_{stage}_alt'
        if single['teacher_s4']:
            reasons[term] = f'the teacher\'s final map is {_grid(geometry["teacher_s4"])}'
        elif single['student_s3']:
            reasons[term] = (f'the student stage-3 map is {_grid(geometry["student_s3"])}, so the stage-3 projections '
                             f'(and the stage-4 projections they query) are spatially constant')
        elif stage == 's4' and single['student_s4']:
            reasons[term] = (f'the student stage-4 map is {_grid(geometry["student_s4"])}, so the stage-4 projector '
                             f'attends over a single key and its output is spatially constant')
    return reasons


def _grid(hw) -> str:
    return f'{hw[0]}x{hw[1]}'


class _Shared:
    """Holds an object that copies share instead of duplicating: the EMA's deep copy of the trainable module
    keeps pointing at the one frozen teacher instead of carrying a second, unused copy of it."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class ScaleKDModule(nn.Module):
    """Student + projectors: everything with gradients, in one module for DDP/EMA."""

    def __init__(self, student: nn.Module, caps: nn.ModuleDict, taps: StudentTaps, tail: TeacherTail):
        super().__init__()
        self.student = student
        self.caps = caps
        self.taps = taps
        self._tail = _Shared(tail)  # the frozen teacher's last stage: not a submodule (stays out of DDP/EMA)

    def no_weight_decay(self):
        student = unwrap_model(self.student)
        names = {'student.' + n for n in student.no_weight_decay()} if hasattr(student, 'no_weight_decay') else set()
        # the official recipes that exempt '.pos_embed' also exempt the projectors' pos_embed
        if any(n.endswith('pos_embed') for n in names):
            names |= {f'caps.{k}.pos_embed' for k in self.caps}
        return names

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits, s3, s4 = forward_student(self.student, x, self.taps)
        return logits, self.heads(s3, s4)

    def heads(self, s3: torch.Tensor, s4: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Projected maps of both views from the student's stage-3 / stage-4 features.

        ``r3_v``: CAP3_v(S3) through the frozen teacher tail (TPP's proxy path, paper Fig. 1c);
        ``p4_v``: CAP4_v(S4) queried by ``r3_v`` (CAP, paper Fig. 1a). All in the teacher's final-map layout.
        """
        caps = self.caps
        views = [v for v in VIEWS if f's3_{v}' in caps]
        p3 = [caps[f's3_{v}'].to_map(caps[f's3_{v}'](s3)) for v in views]  # (B, C3t, H3t, W3t) each
        r3 = dict(zip(views, perceive(self._tail.obj, p3)))  # (B, C4t, H4t, W4t) each
        out = {f'r3_{v}': r3[v] for v in views}
        for v in views:
            cap = caps[f's4_{v}'] if f's4_{v}' in caps else None
            if cap is not None:
                out[f'p4_{v}'] = cap.to_map(cap(s4, queries=r3[v]))
        return out


class ScaleKDTask(DistillTask):
    """ScaleKD distillation task.

    Args:
        student, teacher: timm models; the teacher must have a tail (Swin- or ViT/EVA-style).
        img_size: (H, W) the student trains at; projector shapes are built for it.
        student_s3, student_s4: student taps (see models.features.resolve_student_taps).
        alpha_s3, alpha_s4: (direct, alternative) weights of the feature terms per stage.
        heads_s3, heads_s4: attention heads of the stage-3 / stage-4 projectors.
        softmax_scale: (direct view, alternative view) attention logit scale of the projectors of both
            stages, as the official code reads the pair (one value per view, not per stage).
        cap_norm: 'bn' or 'ln' in the projector stem.
        tail_blocks: blocks in the teacher tail for ViT/EVA teachers (default depth // 12).
        dfm_norm: 'safe' (default: no 0/0 at rounding-level positions of the alternative view) or
            'official' (F.normalize, as the official code; see distillers/dfm.py).
        kd_weight, kd_temperature: logit KD; the student loss is weighted task_weight (default 1 - kd_weight).
        use_teacher_logits: False drops the logit-KD term (``--teacher-features-only``: a teacher whose head was
            trained on other classes); the feature terms stay.
        **kwargs: DistillTask arguments (criterion, mean/std, teacher_mode, teacher_img_size, ...).
    """

    def __init__(
            self,
            student: nn.Module,
            teacher: nn.Module,
            img_size: Tuple[int, int] = (224, 224),
            student_s3=None,
            student_s4=None,
            alpha_s3: Sequence[float] = (0.08, 0.06),
            alpha_s4: Sequence[float] = (0.08, 0.06),
            heads_s3: int = 8,
            heads_s4: int = 8,
            softmax_scale: Sequence[float] = (5.0, 5.0),
            cap_norm: str = 'bn',
            tail_blocks: Optional[int] = None,
            dfm_norm: str = 'safe',
            kd_weight: float = 0.5,
            kd_temperature: float = 1.0,
            task_weight: Optional[float] = None,
            use_teacher_logits: bool = True,
            **kwargs,
    ):
        super().__init__(student, teacher, **kwargs)
        if len(alpha_s3) != 2 or len(alpha_s4) != 2:
            raise ValueError('alpha_s3 and alpha_s4 take two weights each: (direct view, alternative view)')
        if isinstance(softmax_scale, (int, float)):  # the official Swin-B config passes a scalar
            softmax_scale = (float(softmax_scale), float(softmax_scale))
        if dfm_norm not in DFM_NORMS:
            raise ValueError(f'dfm_norm must be one of {DFM_NORMS}, got {dfm_norm!r}')
        self.dfm_norm = dfm_norm
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.alpha = {'s3': tuple(alpha_s3), 's4': tuple(alpha_s4)}
        teacher_size = self.teacher_img_size or tuple(img_size)
        self.tail = TeacherTail(self.teacher.model, teacher_size, num_blocks=tail_blocks)
        taps = resolve_student_taps(student, student_s3, student_s4)

        # student feature shapes from one dry pass (no table of shapes per architecture), on the
        # student's own device: the task may be moved to the training device only after it is built
        was_training = student.training
        student_device = next(student.parameters()).device
        student.eval()
        with torch.no_grad():
            _, s3, s4 = forward_student(student, torch.zeros(1, 3, *img_size, device=student_device), taps)
        student.train(was_training)
        self.geometry = {
            'img_size': tuple(img_size), 'student_s3': tuple(s3.shape[-2:]), 'student_s4': tuple(s4.shape[-2:]),
            'teacher_s3': tuple(self.tail.in_grid), 'teacher_s4': tuple(self.tail.out_grid),
            'query_s3': tuple(self.tail.in_grid), 'query_s4': tuple(self.tail.out_grid)}
        self.constant_terms = constant_terms(self.geometry, self.alpha)

        caps = nn.ModuleDict()
        for i, v in enumerate(VIEWS):
            if self.alpha['s3'][i] == 0 and self.alpha['s4'][i] == 0:
                continue
            caps[f's3_{v}'] = CrossAttentionProjector(
                s3.shape[1], self.tail.in_chs, s3.shape[-2:], self.tail.in_grid, num_heads=heads_s3,
                softmax_scale=softmax_scale[i], learned_query=True, norm=cap_norm)
            if self.alpha['s4'][i] != 0:
                caps[f's4_{v}'] = CrossAttentionProjector(
                    s4.shape[1], self.tail.out_chs, s4.shape[-2:], self.tail.out_grid, num_heads=heads_s4,
                    softmax_scale=softmax_scale[i], learned_query=False, norm=cap_norm)
        caps.to(student_device)
        self.trainable_module = ScaleKDModule(student, caps, taps, self.tail)
        self.loss_weights = {'loss_cls': 1.0 - kd_weight if task_weight is None else task_weight, 'loss_kd': kd_weight}
        if not use_teacher_logits:
            del self.loss_weights['loss_kd']
        for stage in ('s3', 's4'):
            for i, suffix in enumerate(('', '_alt')):
                if self.alpha[stage][i]:
                    self.loss_weights[f'loss_{stage}{suffix}'] = self.alpha[stage][i]

    def check_geometry(self, allow_degenerate: bool = False, logger: Optional[logging.Logger] = None) -> None:
        """Log the grids (to ``logger``); refuse a term that is constant by construction before anything is written."""
        g = self.geometry
        if logger is not None:
            logger.info(f"ScaleKD grids at {_grid(g['img_size'])} px: student stage-3 {_grid(g['student_s3'])}, "
                        f"stage-4 {_grid(g['student_s4'])}; teacher stage-3 {_grid(g['teacher_s3'])}, stage-4 "
                        f"{_grid(g['teacher_s4'])}; projector queries stage-3 {_grid(g['query_s3'])}, stage-4 "
                        f"{_grid(g['query_s4'])}")
        if not self.constant_terms:
            return
        problems = '; '.join(f'{k}: {why}' for k, why in self.constant_terms.items())
        if allow_degenerate:
            if logger is not None:
                logger.warning(f'--scalekd-allow-degenerate: training with terms that are constant by construction '
                               f'(no gradient): {problems}')
            return
        stages = sorted({k.split('_')[1] for k in self.constant_terms})
        raise FatalError(
            f"ScaleKD at --img-size {g['img_size'][-1]}: {problems}. The mean-removed (alternative) view of a "
            f"spatially constant map is zero and teaches nothing. Fix: a larger --img-size (the student's tapped maps "
            f"need more than one position), an earlier tap ({' / '.join(f'--scalekd-student-{s} IDX' for s in stages)}"
            f"), or that view's weight set to 0 ({' / '.join(f'--scalekd-alpha-{s} DIRECT 0' for s in stages)}); or "
            f"pass --scalekd-allow-degenerate to train with it anyway")

    # --- checkpoint layout: student in state_dict, projectors in task_state -----------------
    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        if module is None and hasattr(self, 'eval_model_ema' if ema else 'eval_model'):
            return getattr(self, 'eval_model_ema' if ema else 'eval_model')
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return None
        return unwrap_model(module).student

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Dict]:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return {}
        return {'caps': unwrap_model(module).caps.state_dict()}

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        if not state:
            if strict:
                raise RuntimeError('checkpoint has no ScaleKD projector state (task_state); '
                                   'resume it with the distiller it was trained with')
            return
        module = module if module is not None else self.get_trainable_module(ema=ema)
        unwrap_model(module).caps.load_state_dict(state['caps'], strict=strict)

    def get_clip_parameters(self, exclude_head: bool = False):
        trainable = unwrap_model(self.trainable_module)
        params = list(trainable.student.parameters())
        if exclude_head:
            params = params[:-2]
        return params + list(trainable.caps.parameters())

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile what the step runs: the trainable module (student, the projectors and the teacher tail they call;
        DDP-wrapped first when distributed, so its all-reduce can overlap the compiled backward) and the teacher
        forward (re-normalisation, features, logits, T4). Compiling ``teacher.model`` would not do: the step calls
        its ``forward_features`` / ``forward_head``, which an OptimizedModule hands to the uncompiled module."""
        compile_fn = partial(torch.compile, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = compile_fn(unwrap_model(self.trainable_module).student)
        self.trainable_module = compile_fn(self.trainable_module)
        self.teacher_forward = compile_fn(self.teacher_forward)
        self.compiled = True
        return self.eval_model

    # --- the step ------------------------------------------------------------------------------
    def teacher_targets(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits and final map T4 (NCHW), without gradients."""
        with torch.no_grad(), self.teacher_timer(x):
            return self.teacher_forward(x)

    def teacher_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher on the student's batch: (logits, T4); ``compile()`` replaces it with its compiled form."""
        return forward_teacher(self.teacher.model, self.teacher_input(x), self.tail.out_grid)

    def feature_losses(self, maps: Dict[str, torch.Tensor], t4: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The unweighted feature terms of the enabled views (``loss_s3``, ``loss_s3_alt``, ``loss_s4``,
        ``loss_s4_alt``): DFM's direct and alternative (mean-removed) views, paper Fig. 1b and Fig. 2."""
        out = {}
        for stage, prefix in (('s3', 'r3'), ('s4', 'p4')):
            for i, (v, suffix) in enumerate(zip(VIEWS, ('', '_alt'))):
                if self.alpha[stage][i]:
                    out[f'loss_{stage}{suffix}'] = feature_distance(maps[f'{prefix}_{v}'], t4, alternative=i == 1,
                                                                    norm=self.dfm_norm)
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if getattr(self, 'compiled', False):  # a new step for CUDA graphs (compile modes reduce-overhead, max-autotune)
            torch.compiler.cudagraph_mark_step_begin()
        teacher_logits, t4 = self.teacher_targets(input)
        logits, maps = self.trainable_module(input)
        out = {'output': logits}
        out['loss_cls'] = self.criterion(logits, target)
        if 'loss_kd' in self.loss_weights:
            out['loss_kd'] = kd_loss(logits, teacher_logits, self.kd_temperature)
        out.update(self.feature_losses(maps, t4))
        out['loss'] = sum(w * out[k] for k, w in self.loss_weights.items())
        return out
