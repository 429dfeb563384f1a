"""A real Hugging Face ``Trainer`` with :class:`HuggingFaceTracker` on a tiny GPT-2 (built from a
config, nothing downloaded), a few steps on the CPU: the run folder it writes loads back, with
step 0 (the model before any update) and the trained model's curvature at the last step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from curvscope.linalg import top_eigenpairs  # noqa: E402
from curvscope.operators import HessianOperator  # noqa: E402
from curvscope.tracking import load_run  # noqa: E402
from curvscope.tracking.callbacks import HuggingFaceTracker  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Failed to load image Python extension")

VOCAB, LENGTH = 40, 8


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def examples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (16, LENGTH), generator=generator)
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}
        for row in ids
    ]


def unpack(batch: dict[str, torch.Tensor]):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return inputs, batch["labels"]


def causal_lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def lambda_max(model: torch.nn.Module, batches) -> float:
    op = HessianOperator(model, causal_lm_loss, batches, unpack_batch=unpack)
    return float(top_eigenpairs(op, k=1, tol=1e-10, seed=0).values[0])


def test_trainer_writes_a_loadable_run_with_step_0(tmp_path):
    model = tiny_gpt2()
    initial = copy.deepcopy(model)
    train = examples()
    # The curvature's data: the same examples as fixed dict batches of 8.
    batches = [
        {key: torch.stack([e[key] for e in train[start : start + 8]]) for key in train[0]}
        for start in (0, 8)
    ]
    callback = HuggingFaceTracker(
        tmp_path / "run",
        causal_lm_loss,
        batches,
        "every:1",
        operator_options={"unpack_batch": unpack},
        measurements=("top",),
        progress=False,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, callbacks=[callback]
    )
    trainer.train()

    run = load_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1, 2, 3] and run.problems == []
    assert np.all(np.isfinite(run.scalars["lambda_max"]))
    before = lambda_max(initial, batches)
    after = lambda_max(model, batches)
    assert run.scalars["lambda_max"][0] == pytest.approx(before, rel=1e-6)
    assert run.scalars["lambda_max"][3] == pytest.approx(after, rel=1e-6)
    assert abs(before - after) > 1e-3 * before  # training moved the curvature
    assert np.all(np.isfinite(run.scalars["loss"][1:]))
