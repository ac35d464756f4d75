"""The suite's own layering: a test that launches an entry point is marked e2e, or it fails."""

import sys

import pytest
from conftest import PYTHON_TRAIN, REPO, launch_command, launches_an_entry_point, run_python_train


@pytest.mark.parametrize(
    ("command", "launches"),
    [
        (PYTHON_TRAIN, True),
        (launch_command(num_processes=2), True),
        ([sys.executable, str(REPO / "scripts" / "merge_adapter.py"), "adapter"], True),
        ([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--output_dir", "m"], True),
        (["bash", str(REPO / "scripts" / "cpu.sh")], False),  # the launcher tests: python and accelerate are stubs
        (["mount", "-t", "tmpfs", "tmpfs", "/mnt"], False),
        ("git status", False),
    ],
)
def test_entry_points_are_recognised(command, launches):
    assert launches_an_entry_point(command) is launches


def test_an_unmarked_test_cannot_launch_train_py():
    """Negative control: this test is not marked e2e, so the guard stops the launch before any process starts."""
    with pytest.raises(AssertionError, match="test_an_unmarked_test_cannot_launch_train_py launches .* mark it"):
        run_python_train("--help")


@pytest.mark.e2e
def test_a_marked_test_can():
    assert run_python_train("--help").returncode == 0
