"""Entry point: ``python train.py {fit,validate,test,plan,calibrate,score,export,evaluate,compare} ...``.

``fit``/``validate``/``test`` go through LightningCLI (``training/lightning_cli.py``); every other subcommand has its
own module in ``cli/commands/``. ``python train.py SUBCOMMAND --help`` lists each one's options.
"""

from cli import main

if __name__ == "__main__":
    main()
