"""Scale-out engines (DDP, DeepSpeed ZeRO, FSDP): the option combinations they refuse, and the one setup step
accelerate skips. Which engine runs is read in launch_env.py; the memory estimate is in memory_estimate.py."""

import torch
from transformers import TrainingArguments

from launch_env import USE_CPU_ENV, deepspeed_config, env_flag, fsdp_enabled, launch_env_problems, zero_stage
from options import LoraArguments


def engine_problems(lora_args: LoraArguments, training_args: TrainingArguments) -> list[str]:
    """Engine combinations that would fail late or silently train differently than asked."""
    problems = launch_env_problems(training_args)
    try:
        fsdp, stage = fsdp_enabled(training_args), zero_stage(training_args)
    except ValueError:  # an unreadable value, reported above
        return problems
    deepspeed = deepspeed_config(training_args) is not None  # --deepspeed, or accelerate launch --use_deepspeed
    if deepspeed and fsdp:
        problems.append("--deepspeed and FSDP are both set: pick one engine.")
    if deepspeed and env_flag(USE_CPU_ENV):
        problems.append(
            "--deepspeed under `accelerate launch --cpu`: accelerate then drops DeepSpeed silently and trains plain "
            "DDP. Launch with `accelerate launch --use_deepspeed --num_processes N` and pass --use_cpu true instead."
        )
    if deepspeed and training_args.auto_find_batch_size:
        problems.append(
            "--auto_find_batch_size is not supported with --deepspeed: the DeepSpeed engine fixes its batch size at "
            "start. Drop it and set --per_device_train_batch_size (the memory estimate printed at start helps)."
        )
    if fsdp and not torch.cuda.is_available():
        problems.append(
            "FSDP needs GPUs: accelerate's FSDP plugin requires an accelerator device and stops with 'no available "
            "devices found' on CPU. Use DDP (--use_ddp true --use_cpu true) or DeepSpeed on CPU."
        )
    if lora_args.use_qlora and lora_args.qlora_bit_length == 8 and (stage == 3 or fsdp):
        problems.append(
            "--qlora_bit_length 8 cannot be sharded by ZeRO-3 / FSDP (bitsandbytes 8-bit weights have no storage "
            "dtype option); use --qlora_bit_length 4, or ZeRO-2 / DDP."
        )
    return problems


def init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """DeepSpeed's own communication layer must know the process group before ZeRO-3 partitions weights while they
    load. On GPU accelerate sets it up; with --use_cpu it only starts torch.distributed (accelerate/state.py skips
    `deepspeed.comm.init_distributed` when cpu=True), so DeepSpeed would see a world size of 1 and fail on
    `train_batch_size != micro_batch * grad_acc * world_size`. This wraps the existing gloo group."""
    if training_args.deepspeed and training_args.use_cpu and training_args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
