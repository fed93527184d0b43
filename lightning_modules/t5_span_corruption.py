"""T5 span-corruption pre-training (the paper's T5, section 3; docs/paper.md "T5").

The network is ``transformers``' ``T5ForConditionalGeneration`` with a T5 v1.1 configuration:
gated-GELU feed-forward, RMSNorm (T5LayerNorm) pre-norm blocks, no biases, untied input embedding
and LM head, relative position buckets (32 buckets, distance 128), dropout 0 in pre-training. It
exports with ``save_pretrained`` and loads with ``AutoModelForSeq2SeqLM``.

Layer control covers the encoder and the decoder blocks with the same indices in both (as the
paper's stacking and dropping do). Departure from the paper: the stock T5 keeps one relative
position bias, held by block 0 of each stack and reused by the others; the paper gave every block
its own (``share_positional_bias: False``). Here block 0 therefore always stays active.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from transformers import T5Config, T5ForConditionalGeneration
from transformers.activations import NewGELUActivation
from typing_extensions import override

from core.batch import IGNORE_INDEX, INPUT_IDS, LABELS
from core.errors import UserError
from lightning_modules.fused_loss import linear_cross_entropy
from lightning_modules.optimizers import AdamWScale
from lightning_modules.pretraining import PretrainingModule
from lightning_modules.schedules import ScheduleName

__all__ = ["T5SpanCorruption", "fuse_gelu", "untie_output_head"]

# nanoT5's cosine-budget warm-up: 10,000 of 65,536 scheduler steps (paper section 2.1; docs/paper.md)
PAPER_WARMUP_FRACTION = 10000 / 65536


def untie_output_head(model: T5ForConditionalGeneration) -> None:
    """Give ``lm_head`` its own weight, as T5 v1.1 has (Raffel et al. 2020; the paper's T5, docs/paper.md).

    ``transformers`` 5 ties ``lm_head`` to the input embedding whatever ``tie_word_embeddings`` says
    (``T5Config`` forces it to ``True``); versions before 5 honour ``False`` and leave nothing to do.
    The new weight is drawn as T5 initialises an untied head (normal, std ``initializer_factor``), and
    the config records ``tie_word_embeddings=False`` so that ``save_pretrained`` writes both matrices and
    ``AutoModelForSeq2SeqLM.from_pretrained`` keeps them apart (transformers 5 then logs that it does
    not tie two different matrices, as it does for Google's own v1.1 checkpoints).
    """
    if model.lm_head.weight is model.shared.weight:
        std = float(getattr(model.config, "initializer_factor", 1.0))
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight).normal_(0.0, std))
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop("lm_head.weight", None)  # so a later tie_weights() does not tie it again
    model.config.tie_word_embeddings = False


def fuse_gelu(model: torch.nn.Module) -> int:
    """Run T5's tanh-approximated GELU (``gelu_new``) as one PyTorch kernel; returns how many were replaced.

    ``transformers`` computes ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` as a chain of eight
    element-wise operations, each reading and writing the whole feed-forward activation;
    ``F.gelu(approximate="tanh")`` is the same function in one pass (equal to within 3e-7; about 4x
    faster forward+backward on a CPU). The activation has no weights: ``save_pretrained`` writes the same
    checkpoint, and the exported model computes ``gelu_new`` again.
    """
    replaced = 0
    for module in model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = torch.nn.GELU(approximate="tanh")
            replaced += 1
    return replaced


class T5SpanCorruption(PretrainingModule):
    """T5 v1.1 trained with span corruption.

    Args:
        vocab_size: embedding rows; linked from ``data.vocab_size`` by ``train.py``.
        max_seq_len: encoder input length; linked from ``data.seq_len`` (T5's relative positions
            need no table; recorded for calibration and export).
        num_layers: blocks in the encoder and in the decoder (paper: 12).
        d_model: model width (paper: 768).
        d_ff: feed-forward width (paper: 2048).
        num_heads: attention heads (paper: 12).
        d_kv: width of one head (paper: 64).
        relative_attention_num_buckets: relative position buckets (T5: 32).
        relative_attention_max_distance: largest distinguished distance (T5: 128).
        layer_norm_epsilon: RMSNorm epsilon (T5: 1e-6).
        learning_rate: base LR of the default ``AdamWScale`` (paper: 2e-2).
        betas: AdamWScale betas (paper: 0.9, 0.999).
        eps: AdamWScale epsilon (paper: 1e-6).
        weight_decay: decoupled weight decay (paper: 0).
        optimizer: any ``torch.optim`` class instead of AdamWScale (see ``PretrainingModule``).
        lr_schedule: default ``cosine`` with the paper's settings below.
        warmup_fraction: paper: 10000/65536 of the budget.
        final_lr_fraction: cosine floor (paper: 1e-5).
        warmup_start_fraction: the warm-up starts at half the peak (nanoT5).
        decay_fraction, decay_shape: the final decay of the ``wsd`` schedule.
        float32_matmul_precision: ``high`` = TF32 on GPUs that have it (the paper's T5).
        compile_blocks, retain_host_memory: see ``PretrainingModule``.
    """

    def __init__(
        self,
        vocab_size: int = 32128,
        max_seq_len: int = 512,
        num_layers: int = 12,
        d_model: int = 768,
        d_ff: int = 2048,
        num_heads: int = 12,
        d_kv: int = 64,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        layer_norm_epsilon: float = 1e-6,
        learning_rate: float = 2e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: ScheduleName = "cosine",
        warmup_fraction: float = PAPER_WARMUP_FRACTION,
        final_lr_fraction: float = 1e-5,
        warmup_start_fraction: float = 0.5,
        decay_fraction: float = 0.2,
        decay_shape: Literal["linear", "cosine", "sqrt"] = "linear",
        float32_matmul_precision: Literal["highest", "high", "medium"] | None = None,
        compile_blocks: bool = False,
        retain_host_memory: bool = True,
    ) -> None:
        super().__init__(
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            warmup_fraction=warmup_fraction,
            final_lr_fraction=final_lr_fraction,
            warmup_start_fraction=warmup_start_fraction,
            decay_fraction=decay_fraction,
            decay_shape=decay_shape,
            float32_matmul_precision=float32_matmul_precision,
            compile_blocks=compile_blocks,
            retain_host_memory=retain_host_memory,
        )
        for name, value in (("num_layers", num_layers), ("vocab_size", vocab_size), ("d_model", d_model)):
            if value <= 0:
                raise UserError(f"model.{name}={value} must be positive")
        self.save_hyperparameters(ignore=["optimizer"])
        self.learning_rate, self.betas, self.eps, self.weight_decay = learning_rate, tuple(betas), eps, weight_decay
        config = T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_kv,
            d_ff=d_ff,
            num_layers=num_layers,
            num_decoder_layers=num_layers,
            num_heads=num_heads,
            relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=relative_attention_max_distance,
            dropout_rate=0.0,
            layer_norm_epsilon=layer_norm_epsilon,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            use_cache=False,
        )
        self.model = T5ForConditionalGeneration(config)
        untie_output_head(self.model)
        fuse_gelu(self.model)
        self._init_layer_control([(self.model.encoder, "block"), (self.model.decoder, "block")])

    def required_layers(self) -> tuple[int, ...]:
        """Block 0 holds the relative position bias that every other block reuses."""
        return (0,)

    # ----- optimizer defaults (paper section 3) ------------------------------------------------------
    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return AdamWScale(groups, lr=self.learning_rate, betas=self.betas, eps=self.eps)

    def default_weight_decay(self) -> float:
        return self.weight_decay

    # ----- forward --------------------------------------------------------------------------------
    @override
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``(B, T_target, V)`` with teacher forcing, computed with the active blocks only.

        The decoder reads the labels shifted right (``decoder_start_token_id`` first); the labels are
        not passed to the ``transformers`` model, which would compute a loss the module throws away.
        """
        return self.model.lm_head(self.decoder_states(input_ids, labels))

    def decoder_states(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's final hidden states ``(B, T_target, d_model)`` before ``lm_head``, as
        ``T5ForConditionalGeneration.forward`` computes them (teacher forcing, active blocks only)."""
        decoder_input_ids = self.model._shift_right(labels)
        with self.running_active_layers():
            encoded = self.model.encoder(input_ids=input_ids).last_hidden_state
            states = self.model.decoder(
                input_ids=decoder_input_ids, encoder_hidden_states=encoded, use_cache=False
            ).last_hidden_state
        if getattr(self.model.config, "scale_decoder_outputs", False):
            states = states * (self.model.model_dim**-0.5)
        return states

    def target_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder logits ``(M, V)`` at the M target tokens that are not ignored (never padding)."""
        labels = batch[LABELS]
        return self(batch[INPUT_IDS], labels)[labels != IGNORE_INDEX]

    def token_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every target token ``(B, T_target)``; 0 where the label is ignored."""
        logits = self(batch[INPUT_IDS], batch[LABELS])
        labels = batch[LABELS]
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the target tokens that are not ignored, projection and loss fused
        (``lightning_modules/fused_loss.py``); and their number (a tensor: read only in validation)."""
        labels = batch[LABELS]
        states = self.decoder_states(batch[INPUT_IDS], labels)
        loss = linear_cross_entropy(states, self.model.lm_head.weight, self.model.lm_head.bias, labels)
        return loss, (labels != IGNORE_INDEX).sum()

    @torch.no_grad()
    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean span-corruption loss over each example's target tokens ``(B,)``, eval mode, no gradient."""
        was_training = self.training
        self.eval()
        try:
            counts = (batch[LABELS] != IGNORE_INDEX).sum(1).clamp(min=1)
            return self.token_losses(batch).sum(1) / counts
        finally:
            self.train(was_training)
