"""Studies over trained checkpoints: downstream evaluation (``train.py evaluate``)."""
