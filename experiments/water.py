"""StABlE study of water: `python -m experiments.water --config=experiments/configs/water.py:quick --workdir=runs/water`."""

from experiments.main import main

if __name__ == "__main__":
    main("water")
