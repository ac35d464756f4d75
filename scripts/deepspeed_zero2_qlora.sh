#!/usr/bin/env bash
# QLoRA on every GPU of one machine with DeepSpeed ZeRO-2: each GPU holds the 4-bit base, the adapter's gradients
# and optimizer states are split across the GPUs. For 30-70B models on 8 x 40-80 GB GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=8
DEEPSPEED_CONFIG=deepspeed_configs/3_ds_z2_config.json
MODEL_ID=meta-llama/Llama-3.1-70B-Instruct
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/llama-3.1-70b-qlora-zero2
MAX_LENGTH=2048
BATCH_SIZE=2
GRADIENT_ACCUMULATION_STEPS=4
LEARNING_RATE=0.0002
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
  --use_qlora true \
  --qlora_bit_length 4 \
  --lora_target_modules auto \
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
