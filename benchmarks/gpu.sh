#!/usr/bin/env bash
# The GPU checks of issue 14 in one run of under 10 minutes, each part under its own time limit, in this order:
#   nodes    each adapter node against the frozen op it adapts, forward + backward at the 7B's shapes, eager and
#            compiled, and its cost per train step (`benchmarks.nodes`);
#   graphs   7B train steps with each decoder layer compiled and captured in CUDA graphs, every method and peer
#            against the floor compiled the same way (the decisive ratio);
#   compiled the same compiled without CUDA graphs (inductor's default mode);
#   profile  the kernels of compiled train steps (count and device time per model, and per model a table of its
#            kernels by device time: where the adapters' time goes);
#   recipe   the LaVIN-7B ScienceQA recipe at effective batch 32, micro-batch 4/8/16/32 × accumulation, compiled;
#   eager    eager 7B train steps, peak memory and cached generation of every method and its merged form;
#   decode   compiled decoding: generate with a static cache, each decoder layer compiled, against the base
#            decoding the same way (`DECODE` variants);
#   tests    the CUDA tests (tests/test_cuda.py, tests/test_quantized.py).
#
#   bash benchmarks/gpu.sh                                   # every part; JSON and logs into benchmarks/results
#   PARTS="graphs profile tests" bash benchmarks/gpu.sh      # some of them
#   PARTS=graphs TRAIN="plain v2" bash benchmarks/gpu.sh     # some train variants
#   OUT=/tmp/gpu PRESET=tiny DEVICE=cpu bash benchmarks/gpu.sh    # the same commands on a tiny model, on the CPU
#
# Results of 2026-12-04 (H200, commit 0a09b4c: compiled, recipe, eager, tests; then graphs for plain, V2 and LaVIN
# text): benchmarks/README.md, "After the op diet"; later that day (b655ed7: nodes, graphs, compiled and profile):
# "Where the adapters' time goes".
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
PRESET=${PRESET:-7b}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-nodes graphs compiled profile recipe eager tests}
TRAIN=${TRAIN:-plain lora_qv ia3 v2 lavin_text plain_image lavin_image}  # the train variants of graphs and compiled
DECODE=${DECODE:-plain v2 v2_merged lavin_text lavin_text_merged}  # the generate variants of decode
ADAMW=${ADAMW:-fused}  # the HF Trainer's default optimizer (adamw_torch_fused); torch's own default is foreach
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
tag="${PRESET}_${DEVICE}"
if [ "$PRESET" = tiny ]; then lengths=(8 16); micro=(2 4); else lengths=(128 256 512); micro=(4 8 16 32); fi
read -r -a train <<<"$TRAIN"
read -r -a decode <<<"$DECODE"

part() {  # part NAME SECONDS COMMAND...: when NAME is in $PARTS, COMMAND under a time limit, its log in $OUT
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu.log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "Warning\|warnings.warn\|warn_once" | tee -a "$OUT/gpu.log" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$OUT/gpu.log"
}

$PYTHON - <<'EOF' | tee -a "$OUT/gpu.log"  # what comes back: this log, the JSON and tables
import platform, torch, transformers, peft, timm, accelerate
print(platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__, "peft",
      peft.__version__, "timm", timm.__version__, "accelerate", accelerate.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF
part nodes 100 $PYTHON -m benchmarks.nodes --preset "$PRESET" --device "$DEVICE" --out "$OUT/nodes_${tag}.json"
part graphs 240 $PYTHON -m benchmarks.speed --preset "$PRESET" --device "$DEVICE" --compile layers \
  --compile-mode reduce-overhead --rounds 3 --adamw "$ADAMW" --variants "${train[@]}" --out "$OUT/speed_${tag}_compiled_cudagraphs.json"
part compiled 190 $PYTHON -m benchmarks.speed --preset "$PRESET" --device "$DEVICE" --compile layers --rounds 5 \
  --adamw "$ADAMW" --variants "${train[@]}" --out "$OUT/speed_${tag}_compiled.json"
part profile 150 $PYTHON -m benchmarks.profile --preset "$PRESET" --device "$DEVICE" --compile layers \
  --models plain v2 lavin_text --adamw "$ADAMW" --sort self_device_time_total --tag "${tag}_compiled" \
  --out "$OUT/profile_train_${tag}_compiled.json"
part recipe 170 $PYTHON -m benchmarks.projection --preset "$PRESET" --device "$DEVICE" --compile \
  --micro-batches "${micro[@]}" --lengths "${lengths[@]}" --rounds 2 --out "$OUT/recipe_${tag}_compiled.json"
part eager 140 $PYTHON -m benchmarks.speed --preset "$PRESET" --device "$DEVICE" --rounds 3 --no-projection --adamw "$ADAMW" \
  --variants plain lora_qv ia3 v2 v2_merged lavin_text lavin_text_merged plain_image lavin_image lavin_image_merged \
  --out "$OUT/speed_${tag}.json"
part decode 240 $PYTHON -m benchmarks.speed --preset "$PRESET" --device "$DEVICE" --compile layers --kinds generate \
  --rounds 3 --variants "${decode[@]}" --out "$OUT/speed_${tag}_compiled_generate.json"
part tests 70 $PYTHON -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_quantized.py
