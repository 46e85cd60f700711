#!/usr/bin/env bash
# ScaleKD step on one CUDA GPU: Swin-L -> ResNet-50-D and Swin-L -> ViT-B/16 at 224 px, bf16 autocast (teacher
# held in bf16), channels-last, random weights (nothing is downloaded), generated JPEG files with the recipes'
# RandAugment. Each pair runs in three modes: eager, compiled (--torchcompile inductor) and compiled + CUDA graphs
# (--torchcompile-mode reduce-overhead). Prints, per pair and mode: img/s of the full step and of train_kd.py's
# own loop (its console figure), peak memory, achieved TFLOP/s and the fraction of the device's dense bf16 peak
# (looked up from the device name; the table is printed), and keeps each run's JSON in $OUT_DIR. The whole check
# stays within $BUDGET seconds (default 450, so under 8 minutes with start-up): each run gets at most what is
# left of it, the compiled runs last.
#
#   bash benchmarks/gpu_check.sh                      # repo .venv if present, else python3
#   PYTHON=/path/to/python STEPS=20 bash benchmarks/gpu_check.sh
#   TINY=1 bash benchmarks/gpu_check.sh               # the demo pair on CPU, seconds (tests/test_benchmark.py)
#
# Environment: PYTHON, OUT_DIR, STEPS, WARMUP, WORKERS, BUDGET, RUN_TIMEOUT (seconds per run at most), MODES
# (default "eager compiled reduce-overhead"), BACKEND (default inductor), BATCH_R50 / BATCH_VIT (batch sizes),
# JPEG_DIR (generated JPEG files, reused between runs), TINY.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-output/gpu_check}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-3}
WORKERS=${WORKERS:-8}
BUDGET=${BUDGET:-450}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
MODES=${MODES:-eager compiled reduce-overhead}
BACKEND=${BACKEND:-inductor}
JPEG_DIR=${JPEG_DIR:-$OUT_DIR/jpeg}
TINY=${TINY:-}
mkdir -p "$OUT_DIR"
START=$(date +%s)

if [ -n "$TINY" ]; then
    R50=(--model scalekd_demo_resnet --teacher scalekd_demo_vit --img-size 32 --num-classes 10 -b 4)
    VITB=(--model scalekd_demo_mixer --teacher scalekd_demo_vit --img-size 32 --num-classes 10 -b 4)
    COMMON=(--device cpu --amp --threads 1 --no-heap-cache --steps "$STEPS" --warmup "$WARMUP" -j 0)
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device visible to $PYTHON; run it on a GPU machine (or TINY=1 for the CPU check)" >&2
        exit 2
    fi
    R50=(--config recipes/swinl_r50.yaml)
    VITB=(--config recipes/swinl_vitb.yaml)
    [ -n "${BATCH_R50:-}" ] && R50+=(-b "$BATCH_R50")
    [ -n "${BATCH_VIT:-}" ] && VITB+=(-b "$BATCH_VIT")
    COMMON=(--device cuda --amp --channels-last --img-size 224 --num-classes 1000 --steps "$STEPS" --warmup "$WARMUP"
            -j "$WORKERS")
fi
"$PYTHON" - <<'EOF'
import torch, timm
from benchmarks.step_breakdown import DENSE_BF16_PEAK_TFLOPS, dense_bf16_peak
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
entry, peak = dense_bf16_peak(name) if torch.cuda.is_available() else (None, None)
print(f'torch {torch.__version__}, timm {timm.__version__}, device {name}')
print('dense bf16 peak table (TFLOP/s, first match of the device name wins): ' +
      ', '.join(f'{k} {v:g}' for k, v in DENSE_BF16_PEAK_TFLOPS))
print(f'this device: {entry} {peak:g} TFLOP/s' if peak else 'this device: not in the table (no fraction of peak)')
EOF

status=0
run() {  # run NAME MODE ARGS...
    local name=$1 mode=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT ))
    if [ "$limit" -lt 20 ]; then
        echo "=== $name $mode: skipped, the ${BUDGET}s budget is spent"; status=1; return
    fi
    local extra=()
    case $mode in
        eager) ;;
        compiled) extra=(--torchcompile "$BACKEND") ;;
        reduce-overhead) extra=(--torchcompile "$BACKEND" --torchcompile-mode reduce-overhead) ;;
        *) echo "unknown mode $mode"; status=1; return ;;
    esac
    echo "=== $name $mode (at most ${limit}s) ==="
    PYTHONUNBUFFERED=1 timeout "$limit" "$PYTHON" benchmarks/step_breakdown.py "$@" "${COMMON[@]}" "${extra[@]}" \
        --jpeg-dir "$JPEG_DIR" --json "$OUT_DIR/${name}_${mode}.json" | grep -v ' INFO ' \
        || { echo "$name $mode: FAILED or timed out"; status=1; }
}
for mode in $MODES; do
    run swinl_r50 "$mode" "${R50[@]}"
    run swinl_vitb "$mode" "${VITB[@]}"
done

# one teacher pass, three students (train_kd.py --model A,B,C): Swin-L -> ResNet-50-D with ScaleKD, KD and DIST,
# trained jointly vs one after another, eager (TINY: the demo pair on CPU)
if [ -n "$TINY" ]; then
    JOINT=(--model scalekd_demo_resnet --teacher scalekd_demo_vit --img-size 32 --num-classes 10 -b 4 --device cpu
           --threads 1 --steps "$STEPS" --warmup "$WARMUP")
else
    JOINT=(--model resnet50d --teacher swin_large_patch4_window7_224 --img-size 224 --num-classes 1000
           -b "${BATCH_R50:-64}" --device cuda --amp --channels-last --steps "$STEPS" --warmup "$WARMUP")
fi
left=$(( BUDGET - ($(date +%s) - START) ))
if [ "$left" -ge 20 ]; then
    echo "=== joint swinl -> r50 {scalekd, kd, dist} (at most $(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT ))s) ==="
    PYTHONUNBUFFERED=1 timeout $(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT )) "$PYTHON" benchmarks/multi_student.py \
        "${JOINT[@]}" --distiller scalekd,kd,dist --json "$OUT_DIR/joint_r50.json" || { echo "joint: FAILED or timed out"; status=1; }
else
    echo "=== joint: skipped, the ${BUDGET}s budget is spent"; status=1
fi

echo "=== summary ($OUT_DIR, $(( $(date +%s) - START ))s) ==="
"$PYTHON" - "$OUT_DIR" $MODES <<'EOF'
import json, os, sys
out, modes = sys.argv[1], sys.argv[2:]
print(f"{'pair':<12} {'mode':<16} {'batch':>5} {'step img/s':>10} {'loop img/s':>10} {'peak GiB':>8} {'TFLOP/s':>8} "
      f"{'% bf16 peak':>11} {'vs reference':>12}")
for name in ('swinl_r50', 'swinl_vitb'):
    last = None
    for mode in modes:
        path = os.path.join(out, f'{name}_{mode}.json')
        if not os.path.exists(path):
            print(f'{name:<12} {mode:<16} no result')
            continue
        r = last = json.load(open(path))
        fs = r['full_step']
        frac = f"{100 * fs['fraction_of_bf16_peak']:.1f}%" if fs.get('fraction_of_bf16_peak') else '-'
        loop = f"{r['trainer_step_img_per_s']:.1f}" if 'trainer_step_img_per_s' in r else '-'
        ref = f"{r['speedup_vs_reference_same_precision']:.2f}x" if 'speedup_vs_reference_same_precision' in r else '-'
        print(f"{name:<12} {mode:<16} {r['batch_size']:>5} {fs['img_per_s']:>10.1f} {loop:>10} "
              f"{fs['peak_mem_gib']:>8.2f} {fs['tflops_per_s']:>8.1f} {frac:>11} {ref:>12}")
    if last is not None:
        print(f"  ({last['teacher']} -> {last['model']}, {last['device_name']}, {last['amp'] or 'fp32'}, "
              f"{'channels-last' if last['channels_last'] else 'NCHW'})")
EOF
exit $status
