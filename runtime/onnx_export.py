"""``export.py --onnx FILE``: the student as an ONNX graph (timm's ``timm.utils.onnx.onnx_export``, the TorchScript
exporter, checked by ``onnx.checker``), published only when onnxruntime's logits match the PyTorch student's.

* The check runs the graph (onnxruntime, CPU) and the student (PyTorch, CPU, fp32) on the validation images of
  ``--validate-data`` (timm's eval transform of the run's data config), else on random input (seed 0), and reports
  the largest absolute logit difference and the top-1 agreement; above ``--onnx-atol`` the file is not written.
* The batch axis is fixed to ``--onnx-batch-size`` (default 1) unless ``--dynamic-batch`` (any batch size; the
  check then runs batches of several sizes).
* onnx and onnxruntime are optional: imported only with ``--onnx``, a clear message when missing.
"""
import logging
import os
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

from .checkpoint import fsync_dir
from .errors import FatalError, short

_logger = logging.getLogger('export')

ONNX_DOMAINS = {  # runtime.flag_domains.check_numeric_flags format
    'onnx_atol': ('float', ('>', 0), None, 'largest accepted |ONNX - PyTorch| logit difference'),
    'onnx_batch_size': ('int', 1, None, 'batch size of the ONNX graph (with a fixed batch axis)'),
    'onnx_check_images': ('int', 0, None, 'number of images the ONNX check compares (0: all)'),
    'onnx_opset': ('int', 7, None, 'ONNX opset version'),
}


class OnnxCheckError(FatalError):
    """The ONNX graph's logits are not the student's."""
    exit_code = 1


def add_onnx_args(parser) -> None:
    parser.add_argument('--onnx', default='', metavar='FILE',
                        help='also write the student as an ONNX graph (timm\'s onnx_export), kept only when '
                             'onnxruntime\'s logits match the PyTorch student\'s within --onnx-atol')
    parser.add_argument('--dynamic-batch', action='store_true',
                        help='the ONNX graph takes any batch size (default: fixed to --onnx-batch-size)')
    parser.add_argument('--onnx-batch-size', type=int, default=1, metavar='N',
                        help='batch size of the ONNX graph without --dynamic-batch (default: 1)')
    parser.add_argument('--onnx-atol', type=float, default=1e-3, metavar='TOL',
                        help='refuse the ONNX file when a logit differs from PyTorch\'s by more (default: 1e-3)')
    parser.add_argument('--onnx-check-images', type=int, default=0, metavar='N',
                        help='compare on the first N validation images (default 0: all of --validate-data; '
                             'random input: 2 x --onnx-batch-size + 1 images)')
    parser.add_argument('--onnx-opset', type=int, default=None, metavar='N', help='ONNX opset (default: torch\'s)')


def check_onnx_args(args: Any) -> None:
    """Before anything is written: the packages, the file name, the numeric flags."""
    if not args.onnx:
        if args.dynamic_batch:
            raise FatalError('--dynamic-batch goes with --onnx FILE')
        return
    from .flag_domains import check_numeric_flags
    check_numeric_flags(args, ONNX_DOMAINS)
    missing = []
    for name in ('onnx', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError as e:
            missing.append(f'{name} ({short(e)})')
    if missing:
        raise FatalError(f"--onnx needs {' and '.join(missing)}: install them (pip install onnx onnxruntime) or "
                         f"drop --onnx")
    if not args.onnx.endswith('.onnx'):
        raise FatalError(f"--onnx '{args.onnx}' must end in .onnx")


def _validation_images(data_dir: str, data_config: Dict[str, Any], batch_size: int, workers: int):
    from timm.data import create_dataset, create_transform
    dataset = create_dataset('', root=data_dir, split='validation', is_training=False)  # validation/ or val/
    dataset.transform = create_transform(**{k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std',
                                                                         'crop_pct', 'crop_mode')})
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return (x for x, _ in loader), f'the validation images of {data_dir}'


def _random_images(input_size, batch_size: int):
    """Two random batches, of ``batch_size`` and ``batch_size + 1`` images (a dynamic axis runs both sizes)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn((s,) + tuple(input_size), generator=g) for s in (batch_size, batch_size + 1)), \
        'random input (seed 0)'


def _chunks(batches: Iterable[torch.Tensor], size: Optional[int]):
    """The batches as they come (a dynamic batch axis), or re-cut to ``size`` images, the last one padded with
    copies of its first image (a fixed axis); yields (input, number of real images)."""
    if size is None:
        yield from ((x, x.shape[0]) for x in batches)
        return
    held = None
    for x in batches:
        held = x if held is None else torch.cat([held, x])
        while held.shape[0] >= size:
            yield held[:size], size
            held = held[size:]
    if held is not None and held.shape[0]:
        n = held.shape[0]
        yield torch.cat([held, held[:1].expand(size - n, *held.shape[1:])]), n


def export_onnx(model: nn.Module, path: str, data_config: Dict[str, Any], args: Any) -> Dict[str, Any]:
    """Write ``path`` (timm's onnx_export to a temporary file, then the check, then a rename); returns the check's
    numbers. ``args``: --onnx-* flags, --dynamic-batch, --validate-data, --batch-size, --workers."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx.tools.update_model_dims import update_inputs_outputs_dims
    from timm.utils.onnx import onnx_export

    model = model.cpu().eval()
    input_size = tuple(data_config['input_size'])
    fixed = None if args.dynamic_batch else args.onnx_batch_size
    limit = args.onnx_check_images or None
    if args.validate_data:
        batches, source = _validation_images(args.validate_data, data_config, args.batch_size, args.workers)
    else:
        batches, source = _random_images(input_size, args.onnx_batch_size)
    example = torch.randn((args.onnx_batch_size,) + input_size, generator=torch.Generator().manual_seed(1))
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.partial-{os.getpid()}-{base}')
    try:
        try:
            onnx_export(model, tmp, example_input=example, opset=args.onnx_opset, check=True)
            if fixed is not None:  # timm's exporter names the batch axis 'batch': fix it to the example's
                graph = onnx.load(tmp)
                out_dims = [fixed] + [d.dim_value or d.dim_param for d in
                                      graph.graph.output[0].type.tensor_type.shape.dim[1:]]
                graph = update_inputs_outputs_dims(graph, {graph.graph.input[0].name: [fixed, *input_size]},
                                                   {graph.graph.output[0].name: out_dims})
                onnx.checker.check_model(graph, full_check=True)
                onnx.save(graph, tmp)
        except Exception as e:  # an operator the exporter cannot write, a checker failure
            raise FatalError(f"--onnx: timm's onnx_export failed for this student ({short(e)}); try --onnx-opset "
                             f"N (e.g. 17) or drop --onnx") from None
        session = onnxruntime.InferenceSession(tmp, providers=['CPUExecutionProvider'])
        input_name = session.get_inputs()[0].name
        max_diff, images, agree, sizes = 0.0, 0, 0, set()
        with torch.inference_mode():
            for x, n in _chunks(batches, fixed):
                x = x[:limit - images] if limit and fixed is None else x
                n = min(n, limit - images) if limit else n
                ref = model(x.float()).float().numpy()[:n]
                out = session.run(None, {input_name: x.float().numpy()})[0][:n]
                max_diff = max(max_diff, float(np.abs(out - ref).max()))
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                images += n
                sizes.add(x.shape[0])
                if limit and images >= limit:
                    break
        if not images:
            raise FatalError(f'--onnx: no image to compare in {source}')
        result = dict(onnx=path, max_abs_diff=max_diff, images=images, top1_agreement=100.0 * agree / images,
                      batch_sizes=sorted(sizes), source=source, dynamic_batch=fixed is None, atol=args.onnx_atol)
        what = f'ONNX vs PyTorch logits on {images} images ({source}; batch sizes ' \
               f'{", ".join(map(str, sorted(sizes)))}): max |diff| {max_diff:.3g}, top-1 agreement ' \
               f'{result["top1_agreement"]:.2f}%'
        if not max_diff <= args.onnx_atol:  # NaN refuses too
            raise OnnxCheckError(f"{what}, above --onnx-atol {args.onnx_atol:g}: '{path}' was not written")
        os.replace(tmp, path)
        fsync_dir(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _logger.info(f"{what} (--onnx-atol {args.onnx_atol:g}). Wrote '{path}' (input "
                 f"{'batch' if fixed is None else fixed} x {' x '.join(map(str, input_size))}, "
                 f"{'dynamic' if fixed is None else 'fixed'} batch axis)")
    return result
