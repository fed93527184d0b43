"""``train.py score --config CFG [--config OVERLAY] --ckpt_path PATH|last --output FILE.npy [--passes N]``: write the
irreducible loss of every training example (RHO-loss) and its JSON sidecar."""

from __future__ import annotations

import argparse
import os

from callbacks.batch_selection import score_training_examples
from core.checkpoints import check_checkpoint, resume_target
from core.errors import UserError
from training.lightning_cli import configured

TAKES_CONFIG = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", required=True, help="the irreducible-loss model's checkpoint, or 'last' "
                        "(the newest last.ckpt of this config's runs)")
    parser.add_argument("--output", required=True, help="where to write the losses (.npy; the sidecar goes beside it, .json)")
    parser.add_argument("--passes", type=int, default=1, help="passes of training masks to score (default 1); RhoLoss "
                        "refuses a run that reads more passes (unless allow_pass_reuse) and names the number it needs")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per forward (default: data.eval_batch_size)")


def run(args: argparse.Namespace) -> None:
    if not args.output.endswith(".npy"):
        raise UserError(f"--output {args.output}: name the file .npy (numpy, no pickle)")
    trainer, model, datamodule = configured(args.config_args)
    checkpoint = args.ckpt_path
    if checkpoint == "last":  # the newest intact checkpoint of this config's runs, as `fit --ckpt_path last`
        root = os.path.join(trainer.logger.save_dir, trainer.logger.name)
        target = resume_target(root, "last")
        if target is None:
            raise UserError(f"--ckpt_path last: no checkpoint under {root}/version_*/checkpoints: train that model first")
        checkpoint = str(target.checkpoint)
    else:
        check_checkpoint(checkpoint)
    sidecar = score_training_examples(trainer, model, datamodule, checkpoint, args.output, args.passes, args.batch_size)
    costs = sidecar["costs"]
    priced = f"{costs['scoring_rst_seconds']:.1f} RST-seconds" if costs["scoring_rst_seconds"] is not None else "unpriced"
    print(f"wrote {args.output}: {sidecar['examples']['num_examples']:,} training examples x {args.passes} pass(es), "
          f"mean irreducible loss {sidecar['mean_loss']:.4f}, scored by {checkpoint} in {costs['scoring_wall_seconds']:.1f} s "
          f"({priced}); sidecar {args.output[:-4]}.json")
