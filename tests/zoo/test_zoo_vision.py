"""Model zoo, vision: torchvision's ResNet-18 built from code (11M parameters: products only,
no dense matrix) and a ResNet-shaped model defined here (BasicBlocks, BatchNorm in train and
eval mode, residual adds, adaptive pooling), which needs no torchvision."""

from __future__ import annotations

import pytest
import zoo_models as zm
from zoo_check import check_products

# torchvision warns that its optional image extension did not load; the models need none of it.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to load image Python extension")


@pytest.mark.parametrize("keep_graphs", [True, False], ids=["kept", "rebuilt"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet_shaped_model(train: bool, keep_graphs: bool) -> None:
    check_products(zm.small_resnet(train=train), keep_graphs=keep_graphs)


def test_torchvision_resnet18() -> None:
    """Eval mode (BatchNorm with running statistics) on 3 images of 3x16x16 in two batches;
    train-mode BatchNorm is covered by the small models. One product and one block of 3."""
    pytest.importorskip("torchvision")
    case = zm.resnet18(train=False, batch_sizes=(2, 1))
    assert case.num_params > 11_000_000
    check_products(case, num_vectors=1, block=3)
