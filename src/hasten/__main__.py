"""``python -m hasten``: the command line, also as ``torchrun --nproc-per-node N -m hasten <command> ...``."""

from .cli.app import main

if __name__ == "__main__":
    main()
