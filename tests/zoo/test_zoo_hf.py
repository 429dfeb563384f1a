"""Model zoo, Hugging Face transformers built from tiny configs (no download): GPT-2, whose
input and output embeddings are one tied parameter, and BERT with a classification head and
with a masked-LM head (its decoder is tied to the word embeddings). Batches are dicts
``{"input_ids", "attention_mask", "labels"}`` split by ``unpack_batch``; the model returns a
``ModelOutput`` whose ``.logits`` the loss reads. Attention runs through
``F.scaled_dot_product_attention`` (transformers' default "sdpa" implementation)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import zoo_models as zm
from zoo_check import check_products

# torchvision (imported by transformers too, where installed) warns that its optional image
# extension did not load; the models need none of it.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to load image Python extension")

KEEP = pytest.mark.parametrize("keep_graphs", [True, False], ids=["kept", "rebuilt"])


def named_total(model: torch.nn.Module) -> int:
    """Parameter count with every tied parameter counted at each place it is used."""
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


@KEEP
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gpt2(train: bool, keep_graphs: bool) -> None:
    case = zm.gpt2(train=train)
    model = case.model
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.transformer.wte.weight
    op = check_products(case, keep_graphs=keep_graphs)
    unique = sum(p.numel() for p in model.parameters())
    assert op.num_params == unique == named_total(model) - model.lm_head.weight.numel()
    assert "transformer.wte.weight" in op.param_names
    assert "lm_head.weight" not in op.param_names


@KEEP
@pytest.mark.parametrize("head", ["classification", "masked"])
def test_bert(head: str, keep_graphs: bool) -> None:
    case = zm.bert(head=head)
    op = check_products(case, keep_graphs=keep_graphs)
    unique = sum(p.numel() for p in case.model.parameters())
    assert op.num_params == unique
    if head == "masked":  # decoder weight and bias are tied parameters
        assert unique < named_total(case.model)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_float32_products(name: str) -> None:
    """Float32 products of the float32 model, against the float64 reference."""
    case = zm.gpt2() if name == "gpt2" else zm.bert()
    check_products(case, dtype=torch.float32, rtol=1e-4)
