"""`python -m baize_exp [overrides]`: the pipeline, as `baize-run` and `python run.py`."""

from baize_exp.cli import run

if __name__ == "__main__":
    run()
