"""StABlE study of tetrapeptide: `python -m experiments.tetrapeptide --config=experiments/configs/tetrapeptide.py:quick --workdir=runs/tetrapeptide`."""

from experiments.main import main

if __name__ == "__main__":
    main("tetrapeptide")
