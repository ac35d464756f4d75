#!/usr/bin/env bash
# Full fine-tune on every GPU of one machine with FSDP (FULL_SHARD, one unit per decoder layer): like ZeRO-3 through
# PyTorch's own sharding. Add --use_lora true for LoRA. The accelerate config file sets the FSDP options.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=8
ACCELERATE_CONFIG=accelerate_configs/fsdp_full_shard.yaml
MODEL_ID=meta-llama/Llama-3.1-8B-Instruct
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/llama-3.1-8b-full-fsdp
MAX_LENGTH=2048
BATCH_SIZE=2
GRADIENT_ACCUMULATION_STEPS=4
LEARNING_RATE=0.00002
EPOCHS=3

# On SIGTERM the launcher passes the signal to every rank; give them this many seconds to save a checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

exec accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
  train.py \
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
