#!/usr/bin/env bash
# QLoRA (4-bit) on one GPU: the cheapest way to fine-tune a 7-8B model. For Llama-3.1-8B at 2 x 2048 tokens per
# step the memory estimate printed at start is about 18 GiB (a 24 GB GPU); at batch 4 it is 26 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_ID=meta-llama/Llama-3.1-8B-Instruct
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/llama-3.1-8b-qlora
MAX_LENGTH=2048
BATCH_SIZE=2
GRADIENT_ACCUMULATION_STEPS=8
LEARNING_RATE=0.0002
EPOCHS=3

# One process: run train.py directly (exec), so that a preemption's SIGTERM reaches the trainer, which then
# saves a checkpoint. `accelerate launch` with one process does not forward signals to its child.
exec python train.py \
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
