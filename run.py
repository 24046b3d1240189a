"""baize_exp entry point (the same as `baize-run` and `python -m baize_exp`): compose the config with Hydra and
run the pipeline's stages.

    python run.py                       # all stages on the embedded SmolLM2-135M, CPU, offline
    python run.py model=tiny            # the same on a random tiny Llama (~1 min)
    python run.py --help                # config groups and options
"""

from baize_exp.cli import run

if __name__ == "__main__":
    run()
