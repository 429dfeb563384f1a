"""The model zoo: architectures users analyse, each with a loss and a list of batches.

Every builder returns a :class:`ZooCase` whose model, data and loss go straight into
``HessianOperator(case.model, case.loss_fn, case.batches, unpack_batch=case.unpack)``. The
defaults are tiny instances for the compatibility tests (tests/zoo); the size arguments let
``benchmarks/zoo_cost.py`` build the same architectures at realistic sizes. Builders draw from
their own seed inside ``torch.random.fork_rng``, so building a case never moves the global RNG,
and the same call gives the same numbers.

Models are float32 and in the mode the case is about (dropout probabilities are 0, so train mode
is deterministic). Hugging Face models (``transformers``) and torchvision's ResNet-18 are
imported only by their builders.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from cases import _randomise_batchnorm
from torch import nn

LossFn = Callable[[Any, Any], torch.Tensor]
UnpackBatch = Callable[[Any], tuple[Any, Any]]

#: Batch sizes of the tiny cases: two batches, the second one smaller (weights |b| / N).
TINY_BATCHES = (3, 2)


@dataclass
class ZooCase:
    """A model, a mean-reduced loss and a list of batches.

    Attributes:
        unpack: ``batch -> (inputs, targets)`` for batches that are not pairs (None: pairs).
        description: One line for tables: the architecture and its size.
        smooth: The loss is twice differentiable everywhere (no ReLU or max pooling), so
            central differences of the gradient approximate Hessian products.
        exact_reference: Rewrites a copy of the model in place so that plain double backward
            through it is exact (None: it already is). Needed where a PyTorch kernel's second
            derivative is wrong (:func:`explicit_weight_norm`).
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    batches: list[Any]
    unpack: UnpackBatch | None = None
    description: str = ""
    smooth: bool = True
    exact_reference: Callable[[nn.Module], None] | None = None

    @property
    def num_params(self) -> int:
        """Trainable parameters, each tied parameter counted once."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def num_samples(self) -> int:
        return sum(_batch_size(self.unpack(b)[1] if self.unpack else b[1]) for b in self.batches)


def _batch_size(targets: torch.Tensor) -> int:
    return int(targets.shape[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the block; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def split(tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[tuple[Any, ...]]:
    """Cut aligned tensors (first dimension = samples) into consecutive batches of ``sizes``."""
    out, start = [], 0
    for size in sizes:
        out.append(tuple(t[start : start + size] for t in tensors))
        start += size
    return out


def _classes(num: int, num_classes: int) -> torch.Tensor:
    return torch.randint(0, num_classes, (num,))


def _padding_mask(num: int, seq_len: int) -> torch.Tensor:
    """(num, seq_len) bool, True at padded positions; every sequence keeps >= half its tokens."""
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (num,))
    return torch.arange(seq_len).unsqueeze(0) >= lengths.unsqueeze(1)


def padded_pair(batch: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Any]:
    """(x, padding_mask, y) -> ((x, padding_mask), y): the model takes both positionally."""
    x, mask, y = batch
    return (x, mask), y


# ----- plain PyTorch models ----------------------------------------------------------------


def mlp(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 6,
    hidden: Sequence[int] = (8, 8),
    classes: int = 3,
    seed: int = 0,
    digits: bool = False,
) -> ZooCase:
    """tanh MLP with cross-entropy, on Gaussian inputs or on scikit-learn's digits."""
    with seeded(seed):
        if digits:
            from curvscope.zoo import digits_data

            data = digits_data(batch_size=batch_sizes[0])
            batches = [(x, y) for x, y in data]
            features, classes = batches[0][0].shape[1], 10
        else:
            num = sum(batch_sizes)
            batches = split((torch.randn(num, features), _classes(num, classes)), batch_sizes)
        layers: list[nn.Module] = []
        width = features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        model = nn.Sequential(*layers, nn.Linear(width, classes))
    sizes = "-".join(str(s) for s in (features, *hidden, classes))
    return ZooCase("mlp", model, F.cross_entropy, batches, description=f"MLP {sizes}")


def cnn_bn(
    train: bool,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    channels: int = 3,
    image: int = 6,
    classes: int = 3,
    seed: int = 1,
) -> ZooCase:
    """Two convolutions with BatchNorm2d (train: batch statistics; eval: running ones)."""
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.Tanh(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * channels, classes),
        )
        _randomise_batchnorm(model[1])
        _randomise_batchnorm(model[4])
        model.train(train)
        num = sum(batch_sizes)
        batches = split((torch.randn(num, 3, image, image), _classes(num, classes)), batch_sizes)
    mode = "train" if train else "eval"
    return ZooCase(
        f"cnn_bn_{mode}",
        model,
        F.cross_entropy,
        batches,
        description=f"CNN {channels}-{2 * channels} ch, BatchNorm2d {mode}, {image}x{image}",
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class SmallResNet(nn.Module):
    """ResNet-18's shape in small: stem, stages of BasicBlocks (the later ones strided, with
    1x1 shortcuts), adaptive average pooling, a linear head."""

    def __init__(self, widths: Sequence[int] = (4, 8), blocks: int = 1, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(cin, width, stride))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def small_resnet(
    train: bool = True,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    image: int = 8,
    classes: int = 3,
    seed: int = 2,
) -> ZooCase:
    """:class:`SmallResNet` (BasicBlocks, BatchNorm, residual adds, adaptive pooling)."""
    with seeded(seed):
        model = SmallResNet(classes=classes)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                _randomise_batchnorm(module)
        model.train(train)
        num = sum(batch_sizes)
        batches = split((torch.randn(num, 3, image, image), _classes(num, classes)), batch_sizes)
    mode = "train" if train else "eval"
    return ZooCase(
        f"small_resnet_{mode}",
        model,
        F.cross_entropy,
        batches,
        description=f"ResNet-shaped 4-8 ch, BatchNorm {mode}, {image}x{image}",
        smooth=False,
    )


def import_torchvision_models() -> Any:
    """``torchvision.models``; its warning about the optional image extension silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import torchvision.models

    return torchvision.models


def resnet18(
    train: bool = False,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    image: int = 16,
    classes: int = 5,
    seed: int = 3,
) -> ZooCase:
    """torchvision's ResNet-18 (11M parameters) built from code, no weights downloaded."""
    models = import_torchvision_models()
    with seeded(seed):
        model = models.resnet18(weights=None, num_classes=classes)
        if not train:
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    _randomise_batchnorm(module)
        model.train(train)
        num = sum(batch_sizes)
        batches = split((torch.randn(num, 3, image, image), _classes(num, classes)), batch_sizes)
    mode = "train" if train else "eval"
    return ZooCase(
        f"resnet18_{mode}",
        model,
        F.cross_entropy,
        batches,
        description=f"torchvision ResNet-18, BatchNorm {mode}, {image}x{image}",
        smooth=False,
    )


class SequenceClassifier(nn.Module):
    """A recurrent layer (``nn.LSTM`` or ``nn.GRU``) over (B, T, F) inputs and a linear head
    on the last step's output."""

    def __init__(self, cell: str, features: int, hidden: int, layers: int, classes: int) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def recurrent(
    cell: str,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 3,
    hidden: int = 5,
    layers: int = 2,
    seq_len: int = 5,
    classes: int = 3,
    seed: int = 4,
) -> ZooCase:
    """``nn.LSTM`` / ``nn.GRU`` classifier (``cell`` "lstm" or "gru") with cross-entropy."""
    with seeded(seed):
        model = SequenceClassifier(cell, features, hidden, layers, classes)
        num = sum(batch_sizes)
        x = torch.randn(num, seq_len, features)
        batches = split((x, _classes(num, classes)), batch_sizes)
    return ZooCase(
        cell,
        model,
        F.cross_entropy,
        batches,
        description=f"{cell.upper()} {layers}x{hidden}, T={seq_len}, {features} features",
    )


def _masked_mean(h: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1)


class EncoderClassifier(nn.Module):
    """Linear embedding, ``nn.TransformerEncoder`` (dropout 0, batch_first, a key padding
    mask), mean over the tokens that are not padding, linear head. ``model(x, padding_mask)``."""

    def __init__(
        self, features: int, d_model: int, nhead: int, layers: int, ff: int, classes: int
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=ff, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=padding_mask)
        return self.head(_masked_mean(h, padding_mask))


class AttentionClassifier(nn.Module):
    """Self-attention with ``nn.MultiheadAttention`` (``need_weights=False``, which goes through
    ``F.scaled_dot_product_attention``), a residual tanh, masked mean, linear head."""

    def __init__(self, features: int, d_model: int, nhead: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)
        return self.head(_masked_mean(torch.tanh(h + a), padding_mask))


def _padded_sequences(
    batch_sizes: Sequence[int], seq_len: int, features: int, classes: int
) -> list[tuple[torch.Tensor, ...]]:
    num = sum(batch_sizes)
    x = torch.randn(num, seq_len, features)
    return split((x, _padding_mask(num, seq_len), _classes(num, classes)), batch_sizes)


def transformer_encoder(
    train: bool = True,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 4,
    d_model: int = 8,
    nhead: int = 2,
    layers: int = 2,
    ff: int = 12,
    seq_len: int = 5,
    classes: int = 3,
    seed: int = 5,
) -> ZooCase:
    """:class:`EncoderClassifier`; batches are (x, padding_mask, y) triples."""
    with seeded(seed):
        model = EncoderClassifier(features, d_model, nhead, layers, ff, classes).train(train)
        batches = _padded_sequences(batch_sizes, seq_len, features, classes)
    return ZooCase(
        "transformer_encoder",
        model,
        F.cross_entropy,
        batches,
        unpack=padded_pair,
        description=f"TransformerEncoder {layers}x d={d_model} h={nhead} ff={ff}, T={seq_len}",
    )


def multihead_attention(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 4,
    d_model: int = 8,
    nhead: int = 2,
    seq_len: int = 5,
    classes: int = 3,
    seed: int = 6,
) -> ZooCase:
    """:class:`AttentionClassifier`; batches are (x, padding_mask, y) triples."""
    with seeded(seed):
        model = AttentionClassifier(features, d_model, nhead, classes)
        batches = _padded_sequences(batch_sizes, seq_len, features, classes)
    return ZooCase(
        "multihead_attention",
        model,
        F.cross_entropy,
        batches,
        unpack=padded_pair,
        description=f"MultiheadAttention d={d_model} h={nhead}, T={seq_len}",
    )


def layernorm_mlp(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 5,
    hidden: int = 8,
    classes: int = 3,
    seed: int = 7,
) -> ZooCase:
    """Linear, ``nn.LayerNorm``, GELU, linear; MSE against Gaussian targets."""
    with seeded(seed):
        model = nn.Sequential(
            nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, classes)
        )
        with torch.no_grad():  # non-trivial affine parameters (defaults are 1 and 0)
            model[1].weight.add_(0.3 * torch.randn(hidden))
            model[1].bias.add_(0.3 * torch.randn(hidden))
        num = sum(batch_sizes)
        batches = split((torch.randn(num, features), torch.randn(num, classes)), batch_sizes)
    return ZooCase(
        "layernorm_mlp", model, F.mse_loss, batches, description=f"LayerNorm MLP, width {hidden}"
    )


def groupnorm_cnn(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    channels: int = 4,
    groups: int = 2,
    image: int = 6,
    classes: int = 3,
    seed: int = 8,
) -> ZooCase:
    """Convolution, ``nn.GroupNorm``, tanh, average pooling, linear head."""
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * channels, classes),
        )
        with torch.no_grad():
            model[1].weight.add_(0.3 * torch.randn(channels))
            model[1].bias.add_(0.3 * torch.randn(channels))
        num = sum(batch_sizes)
        batches = split((torch.randn(num, 3, image, image), _classes(num, classes)), batch_sizes)
    return ZooCase(
        "groupnorm_cnn",
        model,
        F.cross_entropy,
        batches,
        description=f"CNN {channels} ch, GroupNorm({groups}), {image}x{image}",
    )


class ExplicitWeightNorm(nn.Module):
    """weight = g * v / ||v|| (the norm over every dimension but ``dim``) in plain
    differentiable operations: a stand-in for ``torch.nn.utils.parametrizations``' weight-norm
    parametrization, whose ``torch._weight_norm`` (the fused kernel, chosen for dim 0 or the
    last dim) has a wrong second derivative on torch 2.13 (``gradgradcheck`` fails; the Hessian
    through it is not even symmetric)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(weight_v.dim()) if d != self.dim % weight_v.dim()]
        return weight_v * (weight_g / torch.linalg.vector_norm(weight_v, dim=dims, keepdim=True))


def explicit_weight_norm(model: nn.Module) -> None:
    """Replace every weight-norm parametrization of ``model`` by :class:`ExplicitWeightNorm`
    (same parameters, same names, same values of the weights; exact second derivatives)."""
    from torch.nn.utils.parametrizations import _WeightNorm

    for module in model.modules():
        for chain in getattr(module, "parametrizations", {}).values():
            for i, parametrization in enumerate(chain):
                if isinstance(parametrization, _WeightNorm):
                    chain[i] = ExplicitWeightNorm(parametrization.dim)


def weight_norm_mlp(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 5,
    hidden: int = 6,
    classes: int = 3,
    seed: int = 9,
) -> ZooCase:
    """MLP whose layers carry ``torch.nn.utils.parametrizations.weight_norm``: its parameters
    are ``parametrizations.weight.original0`` (g) and ``original1`` (v)."""
    from torch.nn.utils.parametrizations import weight_norm

    with seeded(seed):
        model = nn.Sequential(
            weight_norm(nn.Linear(features, hidden)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden, classes)),
        )
        num = sum(batch_sizes)
        batches = split((torch.randn(num, features), _classes(num, classes)), batch_sizes)
    return ZooCase(
        "weight_norm_mlp",
        model,
        F.cross_entropy,
        batches,
        description=f"weight_norm MLP {features}-{hidden}-{classes}",
        exact_reference=explicit_weight_norm,
    )


class BagOfEmbeddings(nn.Module):
    """``nn.Embedding`` (token 0 is padding, excluded from the mean), tanh, linear head."""

    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = _masked_mean(self.embedding(tokens), tokens == 0)
        return self.head(torch.tanh(h))


def embedding_bag(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    vocab: int = 9,
    dim: int = 4,
    seq_len: int = 6,
    classes: int = 3,
    seed: int = 10,
) -> ZooCase:
    """:class:`BagOfEmbeddings` on random token sequences padded with token 0."""
    with seeded(seed):
        model = BagOfEmbeddings(vocab, dim, classes)
        num = sum(batch_sizes)
        tokens = torch.randint(1, vocab, (num, seq_len))
        tokens[_padding_mask(num, seq_len)] = 0
        batches = split((tokens, _classes(num, classes)), batch_sizes)
    return ZooCase(
        "embedding", model, F.cross_entropy, batches, description=f"Embedding {vocab}x{dim}"
    )


class TwoHeads(nn.Module):
    """A trunk with a main head and an auxiliary head computed in ``forward`` but never used by
    the loss, plus a ``spare`` head that ``forward`` never calls."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)
        self.aux = nn.Linear(hidden, 2)
        self.spare = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"logits": self.head(h), "aux": self.aux(h)}


def main_head_loss(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the main head only: the auxiliary output does not enter."""
    return F.cross_entropy(outputs["logits"], targets)


def unused_head(
    batch_sizes: Sequence[int] = TINY_BATCHES,
    features: int = 4,
    hidden: int = 5,
    classes: int = 3,
    seed: int = 11,
) -> ZooCase:
    """:class:`TwoHeads` with a loss that reads only the main head."""
    with seeded(seed):
        model = TwoHeads(features, hidden, classes)
        num = sum(batch_sizes)
        batches = split((torch.randn(num, features), _classes(num, classes)), batch_sizes)
    return ZooCase("unused_head", model, main_head_loss, batches, description="two heads")


# ----- Hugging Face transformers -----------------------------------------------------------

PAD, MASK = 0, 1  # token ids of the tiny vocabularies


def unpack_hf(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Hugging Face batch dict -> (keyword inputs, labels)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return inputs, batch["labels"]


def causal_lm_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy from ``outputs.logits`` (B, T, V); -100 labels are ignored."""
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def masked_lm_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the masked positions (labels != -100) from ``outputs.logits``."""
    logits = outputs.logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def sequence_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``outputs.logits`` (B, C) against class labels (B,)."""
    return F.cross_entropy(outputs.logits, labels)


def _token_batches(
    batch_sizes: Sequence[int], seq_len: int, vocab: int, labels: str, classes: int = 2
) -> list[dict[str, torch.Tensor]]:
    """Right-padded random token sequences as Hugging Face dicts.

    Args:
        labels: "causal" (the tokens, -100 at padding), "masked" (a third of the tokens, and
            always the first, replaced by ``MASK`` and labelled; -100 elsewhere) or "class"
            (one class per sequence).
    """
    num = sum(batch_sizes)
    ids = torch.randint(2, vocab, (num, seq_len))
    padded = _padding_mask(num, seq_len)
    ids[padded] = PAD
    attention_mask = (~padded).long()
    if labels == "causal":
        target = ids.masked_fill(padded, -100)
    elif labels == "masked":
        chosen = (torch.rand(num, seq_len) < 1 / 3) & ~padded
        chosen[:, 0] = True
        target = ids.masked_fill(~chosen, -100)
        ids = ids.masked_fill(chosen, MASK)
    else:
        target = _classes(num, classes)
    out = []
    for part_ids, part_mask, part_target in split((ids, attention_mask, target), batch_sizes):
        out.append({"input_ids": part_ids, "attention_mask": part_mask, "labels": part_target})
    return out


def gpt2(
    train: bool = True,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    vocab: int = 50,
    n_positions: int = 16,
    seq_len: int = 8,
    seed: int = 12,
) -> ZooCase:
    """``GPT2LMHeadModel`` from a tiny ``GPT2Config`` (dropout 0; input and output embeddings
    tied), causal LM loss on right-padded sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=n_positions,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=PAD,
        eos_token_id=PAD,
        pad_token_id=PAD,
    )
    with seeded(seed):
        model = GPT2LMHeadModel(config).train(train)
        batches = _token_batches(batch_sizes, seq_len, vocab, "causal")
    return ZooCase(
        "gpt2",
        model,
        causal_lm_loss,
        batches,
        unpack=unpack_hf,
        description=f"GPT-2 {n_layer}x{n_embd} h={n_head} V={vocab}, T={seq_len}",
    )


def _bert_config(
    vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int
) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
        num_labels=2,
    )


def bert(
    head: str = "classification",
    train: bool = False,
    batch_sizes: Sequence[int] = TINY_BATCHES,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 24,
    vocab: int = 40,
    max_positions: int = 16,
    seq_len: int = 8,
    seed: int = 13,
) -> ZooCase:
    """BERT from a small ``BertConfig`` (dropout 0) with ``head`` "classification"
    (``BertForSequenceClassification``, 2 classes) or "masked" (``BertForMaskedLM``, whose
    decoder is tied to the word embeddings)."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    config = _bert_config(vocab, hidden, layers, heads, intermediate, max_positions)
    with seeded(seed):
        if head == "masked":
            model: nn.Module = BertForMaskedLM(config)
            loss_fn, labels = masked_lm_loss, "masked"
        else:
            model, loss_fn, labels = BertForSequenceClassification(config), sequence_loss, "class"
        model.train(train)
        batches = _token_batches(batch_sizes, seq_len, vocab, labels)
    return ZooCase(
        f"bert_{head}",
        model,
        loss_fn,
        batches,
        unpack=unpack_hf,
        description=f"BERT {layers}x{hidden} h={heads} V={vocab} {head}, T={seq_len}",
    )
