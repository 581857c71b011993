#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, as JSON lines and tables, in three parts that each fit one
# device call (<= 10 minutes, bounded by the timeouts below) on an H100/H200. Run from the
# project root after ../shared/gpu/prepare.sh, on the device machine (carry .device):
#   source .device/env.sh && bash bench/gpu.sh speed      # PAM table, steps at 768 + MFU, inference
#   source .device/env.sh && bash bench/gpu.sh loader     # steps at 352 + MFU, loader wall vs step
#   source .device/env.sh && bash bench/gpu.sh camvid     # CamVid val mIoU after 8 minutes
#   source .device/env.sh && bash bench/gpu.sh export     # ONNX: torch vs ORT CUDA / TensorRT
# Output also goes to $OUT (when set) as gpu-<part>.log.
set -uo pipefail
part=${1:?usage: bench/gpu.sh speed|loader|camvid|export}
shards=${SHARDS:-.device/camvid}
log=${OUT:-/tmp}/gpu-$part.log
python - <<'P' | tee "$log"
import json, torch
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "cuda": torch.version.cuda}))
P
case $part in
speed)
  # PAM at a 1024x2048 image's map (128x256), fp32 and bf16: dense vs the per-dtype exact path
  timeout 120 python bench/attention.py --device cuda --sizes 64x64 128x256 --dtypes fp32 bf16 | tee -a "$log"
  # the step at crop 768, batch 8: fp32, bf16, +channels_last, dense PAM, +compile; MFU
  timeout 330 python bench/train_step.py --device cuda --no-ray --backbone resnet50d resnet101d \
    --crop 768 --batch 8 --steps 10 --matrix | tee -a "$log"
  # whole-image inference at 1024x2048, R101d, bf16: efficient vs dense attention
  timeout 90 python bench/inference.py --device cuda --backbone resnet101d --size 1024x2048 --bf16 \
    --repeats 10 | tee -a "$log"
  ;;
loader)
  # the step at crop 352 (R18d is the hungriest for data), then the real loop with the loader:
  # images_per_s_wall / images_per_s_step is the loader's cost (GPU decode on, 12 workers)
  timeout 300 python bench/train_step.py --device cuda --no-ray --backbone resnet18d resnet50d \
    --crop 352 --batch 8 --steps 10 --matrix | tee -a "$log"
  for backbone in resnet18d resnet50d; do
    timeout 140 python bench/time_to_accuracy.py --shards "$shards" --preset camvid --budget 90 \
      --calibrate 20 --set model.backbone=$backbone --set data.loader_workers=12 | tail -1 | tee -a "$log"
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
*) echo "unknown part $part" >&2; exit 2 ;;
esac
