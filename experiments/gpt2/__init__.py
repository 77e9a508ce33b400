"""GPT-2 124M on OpenWebText with torchrun: config (``config.py``), data preparation
(``prepare_owt.py``, needs a network) and the DDP training/evaluation script (``train_gpt2.py``).

See experiments/README.md, section "GPT-2 124M on GPUs".
"""
