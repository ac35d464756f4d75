"""Known-benign library warnings, filtered where they are raised; every other warning still shows.

Importing this module installs the filters for the warnings that libraries raise while being imported (bitsandbytes
warns as soon as `transformers.Trainer` or `peft` is imported), so entry points import it before any of them.
Each entry is something a user cannot act on in a normal run; tests/test_quiet.py runs the quickstart's command and
fails if one of them comes back, or if a progress bar leaves escape debris in a log file.
"""

import logging
import sys
import warnings

# (logger, start of the message) of log records dropped at their logger, with the reason.
BENIGN_LOG_RECORDS = (
    # bitsandbytes looks for an optional, faster CPU inference kernel (the `kernels` package, from the Hub); without
    # it the built-in kernel runs.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# DeepSpeed is imported by accelerate even without --deepspeed, and announces that it found no GPU.
DEEPSPEED_CPU_NOTICE = ("DeepSpeed", "Setting accelerator to CPU")
# (category, start of the message) of Python warnings raised inside the libraries, not by this repository's code.
BENIGN_WARNINGS = (
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` property when it wraps a model.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
)


class DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_log_records(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessages) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(DropMessages(prefix))


def silence_import_warnings() -> None:
    for logger_name, prefix in BENIGN_LOG_RECORDS:
        drop_log_records(logger_name, prefix)
    for category, prefix in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=prefix, category=category)


def silence_run_warnings(uses_deepspeed: bool) -> None:
    """After the options are known: DeepSpeed's no-GPU notice matters only to a run that uses DeepSpeed."""
    if not uses_deepspeed:
        drop_log_records(*DEEPSPEED_CPU_NOTICE)


def quiet_run(uses_deepspeed: bool) -> None:
    """The run's filters, and plain log lines instead of progress bars when output goes to a file."""
    import datasets
    import transformers

    silence_run_warnings(uses_deepspeed)
    if not output_is_terminal():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def output_is_terminal() -> bool:
    """Progress bars redraw with carriage returns: readable on a terminal, debris in a log file."""
    return sys.stderr.isatty()


def silenced_messages() -> list[str]:
    """Every message start filtered here, for the test that checks none comes back."""
    return [prefix for _, prefix in (*BENIGN_LOG_RECORDS, DEEPSPEED_CPU_NOTICE, *BENIGN_WARNINGS)]


silence_import_warnings()
