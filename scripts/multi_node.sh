#!/usr/bin/env bash
# LoRA with DDP over several machines: run this same script on every machine, each with its own MACHINE_RANK
# (0 on the machine at MAIN_PROCESS_IP). The machine-specific values come from the environment, as schedulers set them.
# For DeepSpeed across machines, replace --multi_gpu by --use_deepspeed and add --deepspeed deepspeed_configs/....
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_MACHINES="${NUM_MACHINES:-2}"
GPUS_PER_MACHINE="${GPUS_PER_MACHINE:-8}"
MACHINE_RANK="${MACHINE_RANK:?set MACHINE_RANK: 0 on the main machine, 1..NUM_MACHINES-1 on the others}"
MAIN_PROCESS_IP="${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP: the address of machine 0, reachable from every machine}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
MODEL_ID=meta-llama/Llama-3.1-8B-Instruct
TRAIN_DATA=data/train.jsonl
EVAL_DATA=NA
OUTPUT_DIR=outputs/llama-3.1-8b-lora-multi-node
MAX_LENGTH=2048
BATCH_SIZE=4
GRADIENT_ACCUMULATION_STEPS=1
LEARNING_RATE=0.0002
EPOCHS=3

# On SIGTERM the launcher passes the signal to every rank; give them this many seconds to save a checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

exec accelerate launch --multi_gpu --num_machines "$NUM_MACHINES" \
  --num_processes "$((NUM_MACHINES * GPUS_PER_MACHINE))" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
  --mixed_precision bf16 --dynamo_backend no \
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
