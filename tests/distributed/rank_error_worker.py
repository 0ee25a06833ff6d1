"""`moe-vae train` through its real command line, where rank 1 alone meets bad input before
any collective (a stand-in for an error one rank hits while setting up), while rank 0 goes on
and waits for it. Used by test_deepspeed.py: rank 1's line must not be lost."""

from __future__ import annotations

import os
import sys

from moe_vae import cli
from moe_vae.errors import MoeVaeError
from moe_vae.train import trainer

_setup = trainer.Trainer.__init__


def _rank_1_fails(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    if os.environ.get("RANK") == "1":
        raise MoeVaeError("only rank 1 met this")
    _setup(self, *args, **kwargs)


trainer.Trainer.__init__ = _rank_1_fails  # type: ignore[method-assign]

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(cli.main(argv))
