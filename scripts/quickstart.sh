#!/usr/bin/env bash
# Quick start on CPU: build the tiny local model, fine-tune it with QLoRA (4-bit) on the sample chats,
# then show the loss before/after and one generation. Samples are packed into rows of 128 tokens. Sets up .venv
# itself (about 70 s), then trains for about 10 s.
set -euo pipefail
source "$(dirname "$0")/setup_venv.sh"
cd "$REPO_ROOT"

MODEL_DIR=models/tiny-llama
OUTPUT_DIR=outputs/quickstart

if [ ! -f "$MODEL_DIR/config.json" ]; then
  python scripts/make_tiny_model.py --output_dir "$MODEL_DIR"
fi

accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train.py \
  --model_id "$MODEL_DIR" \
  --train_data sample_data/chat.jsonl \
  --eval_data sample_data/chat_eval.jsonl \
  --output_dir "$OUTPUT_DIR" \
  --cleanup_output_dir_on_start true \
  --use_qlora true \
  --qlora_bit_length 4 \
  --num_train_epochs 3 \
  --per_device_train_batch_size 8 \
  --per_device_eval_batch_size 16 \
  --learning_rate 0.005 \
  --max_length 128 \
  --sample_packing true \
  --logging_steps 10 \
  --eval_strategy steps \
  --eval_steps 0.25 \
  --eval_on_start true \
  --save_strategy no \
  --dataloader_num_workers 0

python scripts/show_run.py "$OUTPUT_DIR" --prompt "What is 12 + 30?"
echo "Chat with it: .venv/bin/python scripts/generate.py $OUTPUT_DIR"
