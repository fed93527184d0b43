"""BERT masked-language-model pre-training (the paper's BERT, section 3; docs/paper.md "BERT").

The network is ``transformers``' ``RobertaPreLayerNormForMaskedLM``: a pre-LN encoder
(``x + Attn(LN(x))``, ``x + FFN(LN(x))``) with a LayerNorm on the embedding output and a final
LayerNorm, as in crammed BERT; it exports with ``save_pretrained`` and loads with
``AutoModelForMaskedLM``. Departures from the paper's crammed BERT, chosen to stay a stock
``transformers`` model: learned absolute positions instead of scaled sinusoidal ones, a GELU MLP
instead of GEGLU, biases kept, and the stock MLM head (dense + GELU + LayerNorm + tied decoder).
One token type, no NSP, dropout 0 in pre-training (the paper trains in eval mode).

Sparse prediction (Cramming): the head runs only on the masked positions, so its cost scales with
the 15 % of tokens that carry a label; the loss equals the dense loss restricted to those positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM
from typing_extensions import override

from core.batch import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, LABELS
from core.errors import UserError
from lightning_modules.fused_loss import linear_cross_entropy
from lightning_modules.optimizers import fusable
from lightning_modules.pretraining import PretrainingModule

__all__ = ["BertMLM"]


class BertMLM(PretrainingModule):
    """Pre-LN BERT trained with masked language modelling and sparse prediction.

    Args:
        vocab_size: embedding rows; linked from ``data.vocab_size`` by ``train.py``.
        max_seq_len: longest sequence; linked from ``data.seq_len``.
        num_layers: encoder layers L (paper: 16).
        hidden_size: model width (paper: 768).
        num_heads: attention heads (paper: 12).
        intermediate_size: MLP width (paper: 3072).
        layer_norm_eps: LayerNorm epsilon (paper: 1e-12).
        initializer_range: standard deviation of the normal initialisation (paper: 0.02).
        pad_token_id: id of ``[PAD]`` (0 with this project's tokenizers).
        learning_rate: peak LR of the default AdamW (paper: 1e-3).
        betas: AdamW betas (paper: 0.9, 0.98).
        eps: AdamW epsilon (paper: 1e-12).
        weight_decay: decoupled weight decay of the default AdamW (paper: 0.01).
        **kwargs: optimizer and schedule settings of ``PretrainingModule``.
    """

    def __init__(
        self,
        vocab_size: int = 32768,
        max_seq_len: int = 128,
        num_layers: int = 16,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-12,
        weight_decay: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise UserError(f"model.hidden_size={hidden_size} is not divisible by model.num_heads={num_heads}")
        for name, value in (("num_layers", num_layers), ("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
            if value <= 0:
                raise UserError(f"model.{name}={value} must be positive")
        self.save_hyperparameters(ignore=["optimizer"])
        self.learning_rate, self.betas, self.eps, self.weight_decay = learning_rate, tuple(betas), eps, weight_decay
        config = RobertaPreLayerNormConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            # RoBERTa numbers positions from pad_token_id + 1
            max_position_embeddings=max_seq_len + pad_token_id + 1,
            type_vocab_size=1,
            layer_norm_eps=layer_norm_eps,
            initializer_range=initializer_range,
            pad_token_id=pad_token_id,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=True,
        )
        self.model = RobertaPreLayerNormForMaskedLM(config)
        self._init_layer_control([(self.model.roberta_prelayernorm.encoder, "layer")])

    # ----- optimizer defaults (paper section 3) ------------------------------------------------------
    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        # fused in 32-true: one kernel, and a non-finite step dropped on the device (callbacks/numerics.py). Under
        # mixed precision the step stays unfused: fp16 loss scaling cannot clip a fused step in Lightning, and under
        # bf16 the published mini results were measured unfused (the first mini, fused: seed 0 5.809 vs 5.577 unfused,
        # seed 1 5.954 vs 6.071; a run stopped mid-descent amplifies rounding as much as a new seed does:
        # docs/performance.md)
        fused = fusable(groups) and not self.mixed_precision()
        return torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas, eps=self.eps, fused=fused)

    def default_weight_decay(self) -> float:
        return self.weight_decay

    # ----- forward --------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``(B, T, H)`` computed with the active layers only."""
        with self.running_active_layers():
            return self.model.roberta_prelayernorm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def masked_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse prediction: the head's features ``(M, H)`` (dense, GELU, LayerNorm) at the M masked
        positions, before the vocabulary projection; their targets; and the mask."""
        hidden = self.encode(batch[INPUT_IDS], batch.get(ATTENTION_MASK))
        mask = batch[LABELS] != IGNORE_INDEX
        head = self.model.lm_head
        features = head.layer_norm(F.gelu(head.dense(hidden[mask])))
        return features, batch[LABELS][mask], mask

    def masked_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse prediction: logits ``(M, V)`` at the M masked positions, their targets, and the mask."""
        features, targets, mask = self.masked_features(batch)
        return self.model.lm_head.decoder(features), targets, mask

    def target_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vocabulary logits ``(M, V)`` at the masked positions (what the loss uses; Sophia samples there)."""
        return self.masked_logits(batch)[0]

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dense MLM logits ``(B, T, V)`` at every position (what the exported model returns)."""
        return self.model.lm_head(self.encode(input_ids, attention_mask))

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the masked tokens (0 when none is masked), projection and loss fused
        (``lightning_modules/fused_loss.py``); and the number of masked tokens."""
        features, targets, _ = self.masked_features(batch)
        decoder = self.model.lm_head.decoder
        return linear_cross_entropy(features, decoder.weight, decoder.bias, targets), int(targets.numel())

    @torch.no_grad()
    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean MLM loss over each example's masked tokens ``(B,)``, in eval mode, without gradient.

        The same loss the training step optimizes (``core.contracts.PerExampleLoss``); an example without a masked token
        scores 0.
        """
        was_training = self.training
        self.eval()
        try:
            logits, targets, mask = self.masked_logits(batch)
            token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
            rows = mask.nonzero(as_tuple=True)[0]
            batch_size = batch[INPUT_IDS].shape[0]
            totals = torch.zeros(batch_size, device=token_loss.device).index_add_(0, rows, token_loss)
            counts = torch.zeros(batch_size, device=token_loss.device).index_add_(0, rows, torch.ones_like(token_loss))
            return totals / counts.clamp(min=1)
        finally:
            self.train(was_training)
