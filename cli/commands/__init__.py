"""One module per project subcommand of ``train.py``.

Each module has a docstring (its ``--help`` description), ``add_arguments(parser)`` and ``run(args)``. A
module with ``TAKES_CONFIG = True`` also takes a LightningCLI configuration (``--config FILE`` and overrides):
the arguments its own parser does not know arrive as ``args.config_args``.
"""
