#!/usr/bin/env bash
# ScaleKD step breakdown on one CUDA GPU: Swin-L -> ResNet-50 and Swin-L -> ViT-B/16 at 224 px, bf16
# autocast, channels-last, synthetic data, random weights (nothing is downloaded). Prints img/s, peak
# memory and achieved TFLOP/s of the full ScaleKD step, the plain student step and the reference step,
# and keeps each pair's JSON in $OUT_DIR. Finishes within about 5 minutes (each pair has a time limit).
#
#   bash benchmarks/gpu_check.sh                      # repo .venv if present, else python3
#   PYTHON=/path/to/python STEPS=20 bash benchmarks/gpu_check.sh
#
# Uses recipes/swinl_r50.yaml and recipes/swinl_vitb.yaml when they exist (their batch size, optimizer,
# loss), else the bare timm models with train_kd.py defaults. Environment: PYTHON, OUT_DIR, STEPS, WARMUP,
# WORKERS, PAIR_TIMEOUT (seconds per pair), BATCH_R50 / BATCH_VIT (override the batch sizes).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-output/gpu_check}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
WORKERS=${WORKERS:-8}
PAIR_TIMEOUT=${PAIR_TIMEOUT:-140}
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON; run it on a GPU machine (or set PYTHON)" >&2
    exit 2
fi
"$PYTHON" -c "import torch, timm; print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}')"

if [ -f recipes/swinl_r50.yaml ]; then
    R50=(--config recipes/swinl_r50.yaml)
else
    R50=(--model resnet50 --teacher swin_large_patch4_window7_224 --img-size 224 --num-classes 1000 -b 64)
fi
if [ -f recipes/swinl_vitb.yaml ]; then
    VITB=(--config recipes/swinl_vitb.yaml)
else
    VITB=(--model vit_base_patch16_224 --model-kwargs class_token=False global_pool=avg fc_norm=False
          --teacher swin_large_patch4_window7_224 --img-size 224 --num-classes 1000 -b 32)
fi
[ -n "${BATCH_R50:-}" ] && R50+=(-b "$BATCH_R50")
[ -n "${BATCH_VIT:-}" ] && VITB+=(-b "$BATCH_VIT")
COMMON=(--device cuda --amp --channels-last --img-size 224 --num-classes 1000 --steps "$STEPS" --warmup "$WARMUP"
        -j "$WORKERS")

status=0
run_pair() {
    local name=$1; shift
    echo "=== $name ==="
    PYTHONUNBUFFERED=1 timeout "$PAIR_TIMEOUT" "$PYTHON" benchmarks/step_breakdown.py "$@" "${COMMON[@]}" \
        --json "$OUT_DIR/$name.json" || { echo "$name: FAILED or timed out (rc $?)"; status=1; }
}
run_pair swinl_r50 "${R50[@]}"
run_pair swinl_vitb "${VITB[@]}"

echo "=== summary ($OUT_DIR) ==="
"$PYTHON" - "$OUT_DIR" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ('swinl_r50', 'swinl_vitb'):
    path = os.path.join(out, name + '.json')
    if not os.path.exists(path):
        print(f'{name}: no result')
        continue
    r = json.load(open(path))
    print(f"{name}: {r['teacher']} -> {r['model']}, batch {r['batch_size']}, {r['device_name']}")
    for part in ('scalekd_step', 'student_step', 'reference_step', 'scalekd_step_fp32', 'teacher_fwd', 'heads_fb'):
        p = r['parts'].get(part)
        if p:
            tf = f"{p['gflops_per_s'] / 1e3:7.1f} TFLOP/s" if p['gflops_per_s'] else '      - TFLOP/s'
            print(f"  {part:<18} {p['ms']:8.1f} ms {p['img_per_s']:8.1f} img/s {tf} peak {p['peak_mem_mb'] / 1024:6.1f} GiB")
    print(f"  step/sum of parts {r['ratio_step_to_sum_of_parts']:.3f}  step/student step "
          f"{r['ratio_step_to_student_step']:.3f}  speed-up vs reference {r.get('speedup_vs_reference', 0):.2f}x"
          f" (fp32 step vs reference {r.get('speedup_vs_reference_same_precision', 0):.2f}x)")
EOF
exit $status
