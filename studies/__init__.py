"""Studies: downstream evaluation (``train.py evaluate``) and method-vs-baseline comparisons (``train.py compare``)."""
