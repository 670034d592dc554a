"""StABlE study of lj: `python -m experiments.lj --config=experiments/configs/lj.py:quick --workdir=runs/lj`."""

from experiments.main import main

if __name__ == "__main__":
    main("lj")
