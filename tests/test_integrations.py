"""The optimizers in real training stacks: ZeroRedundancyOptimizer, Lightning, the HF Trainer.

Lightning and transformers come from the ``integrations`` extra (``pip install -e
'.[integrations]'``, which ``scripts/setup.sh`` installs); their tests are skipped without it.
Models are tiny and built locally: nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from nos_sym import PowerSign, SymbolicOptimizer, sign_decay

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parameters_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------
# ZeroRedundancyOptimizer (one gloo process)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


ZERO_OPTIMIZERS = {
    "PowerSign with a sign decay": (PowerSign, {"lr": 0.1, "sign_decay": sign_decay.linear(10)}),
    "SymbolicOptimizer": (
        SymbolicOptimizer,
        {"rule": "adam", "lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1},
    ),
}


@pytest.mark.parametrize("name", ZERO_OPTIMIZERS)
def test_zero_checkpoints_load_with_weights_only(process_group, name):
    """ZeroRedundancyOptimizer copies its keyword arguments into its param groups: the
    consolidated checkpoint must still be plain data, and resume exactly."""
    cls, kwargs = ZERO_OPTIMIZERS[name]

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, ZeroRedundancyOptimizer(model.parameters(), cls, **kwargs)

    def train(model, optimizer, steps):
        for step in range(steps):
            optimizer.zero_grad()
            model(torch.full((3,), float(step))).pow(2).sum().backward()
            optimizer.step()

    model, optimizer = make()
    train(model, optimizer, 3)
    optimizer.consolidate_state_dict(to=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    train(model, optimizer, 3)

    resumed, resumed_optimizer = make()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, 3)
    assert torch.equal(parameters_of(resumed), parameters_of(model))


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------
def test_lightning_fit_checkpoint_and_resume(tmp_path):
    """fit with ModelCheckpoint, resume with ckpt_path: the same parameters as one run."""
    lightning = pytest.importorskip("lightning")

    class Regression(lightning.LightningModule):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
            )

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            decayed = [p for p in self.parameters() if p.dim() > 1]
            biases = [p for p in self.parameters() if p.dim() == 1]
            return SymbolicOptimizer(
                [{"params": decayed, "weight_decay": 0.01}, {"params": biases, "rule": "sgd"}],
                "powersign",
                lr=0.01,
            )

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())

    def fit(epochs, root, seed=0, ckpt_path=None, callbacks=()):
        model = Regression(seed)
        trainer = lightning.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
            default_root_dir=root,
        )
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model

    checkpoints = tmp_path / "checkpoints"
    saver = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoints, save_top_k=-1, every_n_epochs=1
    )
    uninterrupted = fit(4, tmp_path / "a", callbacks=[saver])
    resumed = fit(4, tmp_path / "b", seed=9, ckpt_path=checkpoints / "epoch=1-step=6.ckpt")
    assert torch.equal(parameters_of(resumed), parameters_of(uninterrupted))


# ---------------------------------------------------------------------------------------------
# The Hugging Face Trainer
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    return transformers


def tiny_bert(transformers, seed=0):
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size=32):
        generator = torch.Generator().manual_seed(2)
        self.ids = torch.randint(1, 40, (size, 8), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        ids = self.ids[index]
        return {"input_ids": ids, "labels": int(ids[0] > 20)}


def hf_arguments(transformers, output_dir, **overrides):
    options = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        **overrides,
    }
    return transformers.TrainingArguments(**options)


def test_hf_trainer_with_our_optimizer_and_scheduler_resumes_exactly(hf, tmp_path):
    def trainer(model):
        optimizer = SymbolicOptimizer(model.parameters(), "adam", lr=1e-3, betas=(0.9, 0.99))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return hf.Trainer(
            model=model,
            args=hf_arguments(hf, tmp_path),
            train_dataset=Tokens(),
            optimizers=(optimizer, schedule),
        )

    uninterrupted = tiny_bert(hf)
    trainer(uninterrupted).train()
    resumed = tiny_bert(hf, seed=9)  # the checkpoint's weights replace these
    trainer(resumed).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert torch.equal(parameters_of(resumed), parameters_of(uninterrupted))


def test_hf_trainer_weight_decay_reaches_the_optimizer(hf, tmp_path):
    """optimizer_cls_and_kwargs: the Trainer puts weight_decay into the param groups."""
    results = {}
    for weight_decay in (0.0, 0.1):
        model = tiny_bert(hf)
        trainer = hf.Trainer(
            model=model,
            args=hf_arguments(
                hf, tmp_path / str(weight_decay), max_steps=2, save_strategy="no",
                weight_decay=weight_decay,
            ),
            train_dataset=Tokens(),
            optimizer_cls_and_kwargs=(SymbolicOptimizer, {"rule": "powersign", "lr": 1e-2}),
        )  # fmt: skip
        trainer.train()
        decays = {group["weight_decay"] for group in trainer.optimizer.param_groups}
        assert decays == {0.0, weight_decay}
        results[weight_decay] = parameters_of(model)
    assert not torch.equal(results[0.0], results[0.1])
