#!/usr/bin/env bash
# Quick start on CPU: fine-tuning teaches a tiny model to answer unit-conversion questions, measured by exact-match
# accuracy on 100 held-out questions before and after.
#  1. Build the tiny local model: tokenizer, chat template, then a short plain-text pretraining on conversion
#     questions and answers ("Q: How many metres are in 47 kilometres?\nA: 47 km = 47000 m"), the held-out
#     conversions excluded.
#     Like a real base model, it has read the facts but cannot answer a chat question.
#  2. Accuracy of that base model on sample_data/chat_eval.jsonl: about 0%.
#  3. QLoRA (4-bit) fine-tune on sample_data/chat.jsonl (1000 chats), then the same accuracy (--eval_accuracy).
# Sets up .venv itself on the first run. See README.md "Quick start" for the measured times.
set -euo pipefail
source "$(dirname "$0")/setup_venv.sh"
cd "$REPO_ROOT"

MODEL_DIR=models/tiny-llama-units
OUTPUT_DIR=outputs/quickstart
BEFORE=outputs/quickstart-base-answers.jsonl

if [ ! -f "$MODEL_DIR/config.json" ]; then
  python scripts/make_tiny_model.py --output_dir "$MODEL_DIR" --pretrain_steps 600
fi
mkdir -p outputs
python scripts/eval_accuracy.py "$MODEL_DIR" --data sample_data/chat_eval.jsonl --max_length 128 \
  --max_new_tokens 24 --label "base model, before fine-tuning" --examples 0 --output "$BEFORE"

accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train.py \
  --model_id "$MODEL_DIR" \
  --train_data sample_data/chat.jsonl \
  --eval_data sample_data/chat_eval.jsonl \
  --output_dir "$OUTPUT_DIR" \
  --cleanup_output_dir_on_start true \
  --use_qlora true \
  --qlora_bit_length 4 \
  --num_train_epochs 5 \
  --per_device_train_batch_size 8 \
  --per_device_eval_batch_size 50 \
  --learning_rate 0.005 \
  --max_length 128 \
  --sample_packing true \
  --logging_steps 20 \
  --eval_strategy no \
  --eval_accuracy true \
  --eval_accuracy_max_new_tokens 24 \
  --save_strategy no \
  --dataloader_num_workers 0

python scripts/show_run.py "$OUTPUT_DIR" --before "$BEFORE"
echo "Chat with it: .venv/bin/python scripts/generate.py $OUTPUT_DIR"
