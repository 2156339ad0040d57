"""tests/torchrun_runs.py: several training runs in ONE torchrun launch, one after the other, each through its script's
main(argv), as `torchrun ... train_stage1.py ARGS` runs it (the process group is joined once and kept). Starting the
processes (importing torch and open_clip) costs more than a tiny run, so tests/test_distributed.py launches once:

    torchrun --nproc_per_node 2 tests/torchrun_runs.py train_stage1.py ARGS --then train_stage2.py ARGS ...
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def main(argv: list[str]) -> None:
    runs, current = [], []
    for arg in argv + ["--then"]:
        if arg == "--then":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    for script, *args in runs:
        importlib.import_module(script.removesuffix(".py")).main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
