"""Fine-tuning GPT-J: config (``config.py``), optimizer (``optimizer.py``), data (``data.py``), the jitted
train and eval steps (``step.py``), the training loop with checkpoints and logging (``loop.py``) and
evaluation (``evaluate.py``); the ``prepare`` / ``train`` / ``eval`` verbs are ``gptj_jax/cli/train.py``.
See docs/training.md.
"""
