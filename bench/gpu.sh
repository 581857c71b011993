#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, as JSON lines and tables, in three parts that each fit one
# device call (<= 10 minutes, bounded by the timeouts below) on an H100/H200. Run from the
# project root after ../shared/gpu/prepare.sh, on the device machine (carry .device):
#   source .device/env.sh && bash bench/gpu.sh speed      # PAM table, R101d steps at 768 + MFU, top kernels, inference
#   source .device/env.sh && bash bench/gpu.sh loader     # loop vs step at 352: prefetch on/off, GPU/CPU decode
#   source .device/env.sh && bash bench/gpu.sh camvid     # CamVid val mIoU after 8 minutes
#   source .device/env.sh && bash bench/gpu.sh export     # ONNX: torch vs ORT CUDA / TensorRT
# and the pipeline itself (Ray, MLflow: `make gpu-bundle` here first, README "On a GPU machine"):
#   source .device/env.sh && source .device/gpu-bundle.sh && bash bench/gpu.sh pipeline
#   TINY=1 bash bench/gpu.sh pipeline   # the same stages on any CPU in minutes (synthetic shards)
# Output also goes to $OUT (when set) as gpu-<part>.log.
set -uo pipefail
part=${1:?usage: bench/gpu.sh speed|loader|camvid|export|pipeline}
shards=${SHARDS:-.device/camvid}
log=${OUT:-/tmp}/gpu-$part.log
python - <<'P' | tee "$log"
import json, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"device": name, "torch": torch.__version__,
                  "cuda": torch.version.cuda}))
P
case $part in
speed)
  # PAM at a 1024x2048 image's map (128x256), fp32 and bf16: dense vs the per-dtype exact path
  timeout 120 python bench/attention.py --device cuda --sizes 64x64 128x256 --dtypes fp32 bf16 | tee -a "$log"
  # the step at crop 768, batch 8, as training builds it (cudnn.benchmark on): fp32, bf16, fp16,
  # +channels_last, dense PAM, +compile; MFU (target: >= 30% for bf16 + channels_last)
  timeout 250 python bench/train_step.py --device cuda --no-ray --backbone resnet101d \
    --crop 768 --batch 8 --steps 10 --matrix | tee -a "$log"
  # torch.profiler's top 25 kernels of that step (bf16, channels_last), by device time
  timeout 60 python bench/train_step.py --device cuda --no-ray --backbone resnet101d \
    --crop 768 --batch 8 --profile --rows 25 | tee -a "$log"
  # whole-image inference at 1024x2048, R101d, bf16: efficient vs dense attention
  timeout 90 python bench/inference.py --device cuda --backbone resnet101d --size 1024x2048 --bf16 \
    --repeats 10 | tee -a "$log"
  ;;
loader)
  # the camvid preset's loop (crop 352, batch 8, bf16, 12 loader workers) against its step alone:
  # loop_vs_step is the loader's cost (target >= 0.97 for R50d). Batches made ahead on a side
  # stream (training's path on CUDA) vs in turn between steps (--prefetch 0, the old path), and
  # JPEGs decoded on the GPU vs by the CPU workers (data.gpu_decode=false); R18d is the hungriest.
  for run in "resnet50d 2 true" "resnet50d 0 true" "resnet50d 2 false" "resnet18d 2 true" \
             "resnet18d 2 false"; do
    set -- $run
    timeout 95 python bench/time_to_accuracy.py --shards "$shards" --preset camvid --budget 40 \
      --calibrate 20 --splits "" --prefetch $2 --set model.backbone=$1 --set data.gpu_decode=$3 \
      --set data.loader_workers=12 | tail -1 | tee -a "$log"
  done
  ;;
export)
  # issue 20's GPU rows at 360x480 and 1024x2048, batch 1: torch fp32/bf16 on CUDA, ONNX Runtime's
  # CUDA provider (fused attention) and TensorRT fp16/int8 (standard attention). Needs
  # onnxruntime-gpu (and onnx, onnxscript to export) on the device: pip install them from
  # .device/wheels when prepare.sh put them there.
  ls .device/wheels/onnxruntime_gpu-*.whl >/dev/null 2>&1 && pip install -q --no-deps .device/wheels/onnx*.whl
  timeout 500 python bench/export.py --rows torch-cuda-fp32,torch-cuda-bf16,ort-cuda-fp32,ort-trt-fp16,ort-trt-int8 \
    --repeats 10 | tee -a "$log"
  ;;
camvid)
  # issue 8's recipe from scratch: 8 minutes of training, then val whole image + flip
  timeout 590 python bench/time_to_accuracy.py --shards "$shards" --preset camvid --budget 480 \
    --set data.loader_workers=12 | tail -1 | tee -a "$log"
  ;;
pipeline)
  # issue 31: danet train with train.use_gpu (its driver SIGKILLed at the first checkpoint, then
  # resumed), the bare loop on the same params, danet evaluate on CUDA, danet tune (2 trials on
  # half a GPU each), danet register; one JSON line per stage (bench/gpu_pipeline.py)
  # (520 s on the GPU, inside a 10-minute call; TINY=1 on a busy 2-core CPU takes up to 9 minutes)
  timeout "$([[ -n ${TINY:-} ]] && echo 1200 || echo 520)" python bench/gpu_pipeline.py \
    --shards "$shards" --out "${PIPELINE_OUT:-/tmp/gpu-pipeline}" ${TINY:+--tiny} | tee -a "$log"
  ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
