"""Commands the README gives that no other test runs as written."""

import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bash_lines(start: str) -> list[str]:
    """The README's bash lines that start with ``start``, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("  #")[0].strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith(start)]


def test_the_readmes_torchrun_command_reaches_the_train_stage():
    """torchrun read the stage's --run as an abbreviation of its own --run-path and refused the command."""
    from torch.distributed.run import get_args_parser

    sys.path.insert(0, str(REPO / "stages"))
    try:
        import train as stage
    finally:
        sys.path.remove(str(REPO / "stages"))
    [command] = [c for c in _bash_lines("torchrun ") if "--faces" in c]
    launched = get_args_parser().parse_args(shlex.split(command)[1:])
    assert launched.training_script == "stages/train.py" and launched.nproc_per_node == "4"
    args = stage.build_parser().parse_args(launched.training_script_args)
    assert (args.run, args.state, args.model) == ("models/run.json", "models/train_state.pt", "models/model.pt")
