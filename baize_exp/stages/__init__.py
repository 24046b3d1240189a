"""The pipeline's stages, one module each, in pipeline order:

    plan      memory per GPU for each strategy and precision (reads nothing; an estimate)
    collect   the teacher writes [Human]/[AI] dialogs from seed questions      -> collect/
    train     LoRA tuning of the base on the dialogs (v1)                       -> train/
    sdf       self-distillation with feedback: v1 samples, the teacher ranks, v2 -> sdf/
    evaluate  answers to held-out questions, judged; held-out loss              -> eval/
    report    the run's report.md (and, as a command, the comparison of runs)

Each declares itself as `STAGE` (see `base.Stage`); the order lives in `baize_exp.pipeline`. A stage reads only
files, imports no other stage, and shares helpers through `base` and the lower layers (io, config, models, chat,
data, training).
"""
