#!/usr/bin/env bash
# LoRA on every GPU of one machine with DDP: one model copy per GPU, the global batch split across them.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=8
MODEL_ID=mistralai/Mistral-7B-Instruct-v0.3
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/mistral-7b-lora-ddp
MAX_LENGTH=2048
BATCH_SIZE=4
GRADIENT_ACCUMULATION_STEPS=1
LEARNING_RATE=0.0002
EPOCHS=3

# On SIGTERM the launcher passes the signal to every rank, which save a checkpoint together; give them this
# many seconds before they are killed (torch's default is 30, too short to save a large model).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

exec accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  train.py \
  --use_ddp true \
  --model_id "$MODEL_ID" \
  --train_data "$TRAIN_DATA" \
  --eval_data "$EVAL_DATA" \
  --output_dir "$OUTPUT_DIR" \
  --use_lora true \
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
