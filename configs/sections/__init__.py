"""Each study's section of the config: the study's configs add it to configs/base.py's training
keys."""
