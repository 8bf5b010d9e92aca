"""``python -m masksae``: the CLI, as launchers start it.

``torchrun --nproc-per-node 2 -m masksae harvest ...`` and
``accelerate launch -m masksae train ...`` run one rank per process through here.
"""

from masksae.cli import app

if __name__ == "__main__":
    app(prog_name="masksae")
