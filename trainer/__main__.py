"""`python -m trainer --help` / `torchrun --nproc_per_node=N -m trainer ...` (see trainer.cli)."""

import sys

from trainer.train_command import main

if __name__ == "__main__":
    sys.exit(main())
