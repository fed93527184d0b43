"""A user's own methods, kept outside the toolkit's packages (docs/adding-a-method.md): put this folder's parent
on ``PYTHONPATH`` (``PYTHONPATH=examples python train.py ...``) or install it as a package of your own."""
