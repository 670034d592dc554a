"""StABlE study of aspirin: `python -m experiments.aspirin --config=experiments/configs/aspirin.py:quick --workdir=runs/aspirin`."""

from experiments.main import main

if __name__ == "__main__":
    main("aspirin")
