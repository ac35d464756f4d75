#!/usr/bin/env bash
# LoRA on CPU, for small models and smoke tests of your own data (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_ID=models/tiny-llama
TRAIN_DATA=sample_data/chat.jsonl
EVAL_DATA=sample_data/chat_eval.jsonl
OUTPUT_DIR=outputs/cpu-lora
MAX_LENGTH=512
BATCH_SIZE=8
LEARNING_RATE=0.005
EPOCHS=1

# One process: run train.py directly (exec), so that a preemption's SIGTERM reaches the trainer, which then
# saves a checkpoint. `accelerate launch` with one process does not forward signals to its child.
exec python train.py \
  --model_id "$MODEL_ID" \
  --train_data "$TRAIN_DATA" \
  --eval_data "$EVAL_DATA" \
  --output_dir "$OUTPUT_DIR" \
  --use_lora true \
  --max_length "$MAX_LENGTH" \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --per_device_eval_batch_size "$BATCH_SIZE" \
  --learning_rate "$LEARNING_RATE" \
  --num_train_epochs "$EPOCHS" \
  "$@"
