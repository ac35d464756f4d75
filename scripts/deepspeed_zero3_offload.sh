#!/usr/bin/env bash
# Full fine-tune with DeepSpeed ZeRO-3, weights and optimizer states offloaded to CPU memory: the largest model per GPU
# (a 70B model on 8 x 80 GB GPUs with about 1.5 TB of CPU RAM), at a fraction of ZeRO-3 speed.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=8
DEEPSPEED_CONFIG=deepspeed_configs/8_ds_z3_offload_param_offload_optimizer_config.json
MODEL_ID=meta-llama/Llama-3.1-70B-Instruct
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/llama-3.1-70b-full-zero3-offload
MAX_LENGTH=2048
BATCH_SIZE=1
GRADIENT_ACCUMULATION_STEPS=8
LEARNING_RATE=0.00002
EPOCHS=3

# On SIGTERM the launcher passes the signal to every rank; give them this many seconds to save a checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

exec accelerate launch --use_deepspeed --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision bf16 \
  --dynamo_backend no \
  train.py \
  --deepspeed "$DEEPSPEED_CONFIG" \
  --model_id "$MODEL_ID" \
  --train_data "$TRAIN_DATA" \
  --eval_data "$EVAL_DATA" \
  --output_dir "$OUTPUT_DIR" \
  --bf16 true \
  --use_flash_attention true \
  --gradient_checkpointing true \
  --max_length "$MAX_LENGTH" \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --per_device_eval_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" \
  --learning_rate "$LEARNING_RATE" \
  --num_train_epochs "$EPOCHS" \
  --resume_from_checkpoint true \
  "$@"
