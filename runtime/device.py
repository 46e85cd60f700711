"""What this machine can run, checked before step 0: bf16 autocast, a working torch.compile, fused optimizer steps.

A recipe asks for bf16 autocast and may ask for ``--torchcompile``; a GPU without bf16 or a machine
without a working compiler would otherwise fail inside the first step (or fall back silently), so both
are tried here and stop the run with a message naming the flag to change. Also the code version
that the start-up log line names.
"""
from typing import Any, Dict, Optional

import torch

from .errors import FatalError

# torch optimizers with a fused CUDA step (one kernel per parameter group instead of foreach passes)
FUSED_ON_CUDA = ('adam', 'adamw')


def check_precision(amp: bool, amp_dtype: str, device: torch.device) -> None:
    """Stop when bf16 autocast is asked for on a CUDA device that has no bf16 (pre-Ampere GPUs)."""
    if amp and amp_dtype == 'bfloat16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise FatalError(f'--amp-dtype bfloat16 (the paper recipes set it) needs a GPU with bf16 support (Ampere or '
                         f'newer); {torch.cuda.get_device_name(device)} has none. Pass --amp-dtype float16 (fp16 with '
                         f'loss scaling) or --no-amp (fp32)')


def _probe(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ w).softmax(-1).sum()


def check_compile(backend: Optional[str], mode: Optional[str], device: torch.device) -> None:
    """Compile and run a tiny forward + backward with ``backend`` / ``mode`` on ``device``.

    Stops (FatalError) when that fails or computes a different value than eager, so that a machine
    without a working compiler (no C compiler for inductor on CPU, no triton on GPU) is found before
    step 0 instead of inside the first training step.
    """
    if not backend:
        return
    flags = f'--torchcompile {backend}' + (f' --torchcompile-mode {mode}' if mode else '')
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=gen).to(device)
    w = torch.randn(16, 16, generator=gen).to(device).requires_grad_()
    try:
        fn = torch.compile(_probe, backend=backend, mode=mode)
        out = fn(x, w)
        out.backward()
        grad = w.grad.clone()
        w.grad = None
        ref = _probe(x, w)
        ref.backward()
        ok = torch.allclose(out.detach(), ref.detach(), rtol=1e-3, atol=1e-4) and \
            torch.allclose(grad, w.grad, rtol=1e-3, atol=1e-4)
    except Exception as e:  # any compiler or backend failure: the message, not a traceback
        detail = ' '.join(str(e).split())[:300]
        raise FatalError(f'{flags} does not work on this machine ({type(e).__name__}: {detail}). Install what the '
                         f'backend needs (a C compiler for inductor on CPU, triton for CUDA), pick another backend '
                         f'(--torchcompile aot_eager), or drop --torchcompile') from None
    if not ok:
        raise FatalError(f'{flags} computes a different value than eager on a test function; drop --torchcompile '
                         f'or pick another backend')


def fused_optimizer_kwargs(opt: str, device: torch.device, opt_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``fused=True`` for torch's Adam/AdamW on CUDA, unless ``--opt-kwargs`` chooses fused or foreach itself.

    Elsewhere torch's default stays (foreach on CUDA, and timm's LAMB is foreach); CPU numerics are unchanged.
    """
    name = opt.lower().split('_')[-1]
    if device.type == 'cuda' and name in FUSED_ON_CUDA and not {'fused', 'foreach'} & set(opt_kwargs):
        return {'fused': True}
    return {}
