"""``compile_blocks``: the compiled model trains as the eager one, and layer changes do not recompile."""

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import tiny_bert_args
from lightning_modules.bert_mlm import BertMLM

pytestmark = pytest.mark.slow  # the whole module runs real fits / the benchmark


def _batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (8, 32), generator=generator)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=generator) < 0.25
    labels[masked] = ids[masked]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _losses(model: BertMLM, depths: list[list[int] | None]) -> list[float]:
    model.prepare_for_steps(torch.device("cpu"))
    optimizer = model.build_optimizer()
    losses = []
    for step, active in enumerate(depths):
        model.set_active_layers(active)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(_batch(step))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_compiled_blocks_give_the_eager_losses_and_depth_changes_do_not_recompile():
    torch.manual_seed(0)
    eager = BertMLM(**tiny_bert_args(num_layers=3))
    compiled = BertMLM(**tiny_bert_args(num_layers=3), compile_blocks=True)
    compiled.load_state_dict(eager.state_dict())
    # full depth, then the depth changes as layer stacking and layer dropping change it
    depths = [None, None, [0], [0, 2], [1, 2], None, [0], [0, 2]]
    torch._dynamo.reset()
    counters.clear()
    compiled_losses = _losses(compiled, depths[:5])
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    compiled_losses += _losses(compiled, depths[5:])
    assert graphs_after_warm_up > 0  # the blocks did compile
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up  # nothing recompiled on later depth changes
    eager_losses = _losses(eager, depths[:5]) + _losses(eager, depths[5:])
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-4)
    assert all(key.startswith("model.") for key in compiled.state_dict())  # checkpoints keep their keys
