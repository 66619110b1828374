"""Fine-tuning GPT-J: config (``config.py``), optimizer (``optimizer.py``), data (``data.py``), the jitted
train and eval steps (``step.py``), the training loop with checkpoints and logging (``loop.py``), and
the ``train`` / ``prepare`` / ``eval`` verbs (``cli.py``). See docs/training.md.
"""
