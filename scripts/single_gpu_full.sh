#!/usr/bin/env bash
# Full fine-tune on one GPU, bf16: for models up to about 1.5B parameters on an 80 GB GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_ID=Qwen/Qwen2.5-0.5B-Instruct
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/qwen2.5-0.5b-full
MAX_LENGTH=2048
BATCH_SIZE=8
GRADIENT_ACCUMULATION_STEPS=2
LEARNING_RATE=0.00002
EPOCHS=3

# One process: run train.py directly (exec), so that a preemption's SIGTERM reaches the trainer, which then
# saves a checkpoint. `accelerate launch` with one process does not forward signals to its child.
exec python train.py \
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
