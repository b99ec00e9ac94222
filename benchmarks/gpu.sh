#!/usr/bin/env bash
# The GPU checks of issue 14 in one run of under 10 minutes, each part under its own time limit, most needed first:
#   1. compiled 7B train steps (regional compilation) of V2 and LaVIN text/images against the compiled floor;
#   2. the LaVIN-7B ScienceQA recipe at effective batch 32, micro-batch 4/8/16/32 × accumulation, compiled;
#   3. eager 7B train steps, peak memory and cached generation of every method and its merged form;
#   4. the CUDA tests (tests/test_cuda.py, tests/test_quantized.py).
#
#   bash benchmarks/gpu.sh                            # on a CUDA machine; JSON and logs into benchmarks/results
#   OUT=/tmp/gpu PRESET=tiny DEVICE=cpu bash benchmarks/gpu.sh    # the same commands on a tiny model, on the CPU
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
PRESET=${PRESET:-7b}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
tag="${PRESET}_${DEVICE}"
if [ "$PRESET" = tiny ]; then lengths=(8 16); micro=(2 4); else lengths=(128 256 512); micro=(4 8 16 32); fi

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "Warning\|warnings.warn\|warn_once" | tee "$OUT/$name.log" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}

$PYTHON - <<'EOF' | tee "$OUT/gpu_env.txt"
import platform, torch, transformers, peft, timm, accelerate
print(platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__, "peft",
      peft.__version__, "timm", timm.__version__, "accelerate", accelerate.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF
part "speed_${tag}_compiled" 190 $PYTHON -m benchmarks.speed --preset "$PRESET" --device "$DEVICE" \
  --compile layers --rounds 5 --variants plain v2 lavin_text plain_image lavin_image \
  --out "$OUT/speed_${tag}_compiled.json"
part "recipe_${tag}_compiled" 170 $PYTHON -m benchmarks.projection --preset "$PRESET" --device "$DEVICE" \
  --compile --micro-batches "${micro[@]}" --lengths "${lengths[@]}" --rounds 2 \
  --out "$OUT/recipe_${tag}_compiled.json"
part "speed_${tag}" 140 $PYTHON -m benchmarks.speed --preset "$PRESET" --device "$DEVICE" --rounds 3 --no-projection \
  --variants plain lora_qv ia3 v2 v2_merged lavin_text lavin_text_merged plain_image lavin_image lavin_image_merged \
  --out "$OUT/speed_${tag}.json"
part "tests_${DEVICE}" 70 $PYTHON -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_quantized.py
