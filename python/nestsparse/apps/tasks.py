"""The model zoo's training tasks, as nestsparse.pruning Tasks: what batches to train on, the logits, the loss and
the test score of each family. The first four need no download (nestsparse.apps.data); the real-data tasks read
the sets `make real-data` installs (nestsparse.apps.real_data).

| family | data | model | score |
|---|---|---|---|
| digits | scikit-learn's 8x8 handwritten digits | ResNet (small) | test accuracy |
| pointcloud | clouds sampled from 8 parametric shapes | PointNet++ (SSG) | test accuracy |
| seq2seq | reversal of random token strings, 5% label noise | GNMT (LSTM + attention) | greedy token accuracy |
| graph | stochastic block model, class-dependent features | GAT | test node accuracy |
| fashion_mnist_task | Fashion-MNIST (60k / 10k, real) | the 28x28 CNN (mnist_cnn) | test accuracy |
| mnist_task | MNIST (60k / 10k, real) | the 28x28 CNN, pretrained or not | test accuracy |
| rotten_tomatoes_task | Rotten Tomatoes fresh / rotten snippets (real) | all-MiniLM-L6-v2 + head | test accuracy |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pruning import SupervisedTask, shard_batches
from . import data, real_data

__all__ = [
    "Seq2SeqTask",
    "GraphTask",
    "digits_task",
    "point_cloud_task",
    "seq2seq_task",
    "graph_task",
    "fashion_mnist_task",
    "mnist_task",
    "rotten_tomatoes_task",
]


def digits_task(seed: int = 0, batch_size: int = 64) -> SupervisedTask:
    """Digits classification: 1257 training and 540 test images."""
    train, test = data.digits(seed)
    return SupervisedTask(train, test, batch_size, seed)


def _subsample(train: tuple[Tensor, Tensor], n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` training samples drawn by a seeded permutation (all of them if None)."""
    if n is None or n >= len(train[1]):
        return train
    idx = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(seed))[:n]
    return train[0][idx], train[1][idx]


def fashion_mnist_task(seed: int = 0, batch_size: int = 128, n_train: int | None = None) -> SupervisedTask:
    """Fashion-MNIST classification (real data, nestsparse.apps.real_data): 60k training images (or ``n_train``
    of them), the 10k test images."""
    train, test = real_data.fashion_mnist()
    return SupervisedTask(_subsample(train, n_train, seed), test, batch_size, seed)


def mnist_task(seed: int = 0, batch_size: int = 128, n_train: int | None = None) -> SupervisedTask:
    """MNIST classification (real data): 60k training images (or ``n_train`` of them), the 10k test images."""
    train, test = real_data.mnist()
    return SupervisedTask(_subsample(train, n_train, seed), test, batch_size, seed)


def rotten_tomatoes_task(
    seed: int = 0, batch_size: int = 32, n_train: int | None = None, max_length: int = 48
) -> SupervisedTask:
    """Rotten Tomatoes fresh (1) / rotten (0) (real data): the fixed split of real_data.rotten_tomatoes (10,246 /
    2,562 snippets; ``n_train`` of the training ones), tokenized by all-MiniLM-L6-v2's tokenizer into (N,
    ``max_length``) token ids, 0-padded (48 tokens hold 95% of the snippets whole; longer ones are cut)."""
    from .models import minilm_tokenizer  # noqa: PLC0415  (needs transformers)

    tokenizer = minilm_tokenizer()
    (train_text, train_y), (test_text, test_y) = real_data.rotten_tomatoes()

    def ids(texts: list[str]) -> Tensor:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"]

    train = _subsample((ids(train_text), train_y), n_train, seed)
    return SupervisedTask(train, (ids(test_text), test_y), batch_size, seed)


def point_cloud_task(
    seed: int = 0, batch_size: int = 32, n_per_class: int = 150, num_points: int = 128
) -> SupervisedTask:
    """Point-cloud shape classification (8 classes)."""
    train, test = data.point_clouds(n_per_class=n_per_class, num_points=num_points, seed=seed)
    return SupervisedTask(train, test, batch_size, seed)


@dataclass
class Seq2SeqTask:
    """Sequence to sequence with teacher forcing; scored by greedy decoding's token accuracy on the test set
    (every target position up to and including EOS)."""

    data: data.Seq2SeqData
    batch_size: int = 64
    seed: int = 0

    def batches(self, epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        src, tgt = self.data.src_train, self.data.tgt_train
        for idx in shard_batches(len(src), self.batch_size, self.seed, epoch):
            yield src[idx], tgt[idx]

    @staticmethod
    def decoder_input(tgt: Tensor) -> Tensor:
        return torch.cat([torch.full_like(tgt[:, :1], data.BOS), tgt[:, :-1]], 1)

    def logits(self, model: nn.Module, batch) -> Tensor:
        src, tgt = batch
        return model(src, self.decoder_input(tgt))

    def loss(self, logits: Tensor, batch) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1), ignore_index=data.PAD)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        correct = total = 0
        for src, tgt in zip(self.data.src_test.split(256), self.data.tgt_test.split(256)):
            out = inner.greedy(src, tgt.shape[1])
            keep = tgt != data.PAD
            correct += int(((out[:, : tgt.shape[1]] == tgt) & keep).sum())
            total += int(keep.sum())
        model.train(was_training)
        return correct / max(total, 1)


def seq2seq_task(seed: int = 0, batch_size: int = 64, n_train: int = 4000) -> Seq2SeqTask:
    """Reverse random strings of 4-10 tokens (vocabulary 20), 5% label noise in training targets."""
    return Seq2SeqTask(data.seq2seq(n_train=n_train, seed=seed), batch_size, seed)


@dataclass
class GraphTask:
    """Transductive node classification on one graph: every step sees the whole graph (on every rank) and
    the loss counts the training nodes; scored on the test nodes."""

    graph: data.Graph
    steps_per_epoch: int = 10

    def batches(self, epoch: int) -> Iterable[data.Graph]:
        return [self.graph] * self.steps_per_epoch

    def logits(self, model: nn.Module, batch: data.Graph) -> Tensor:
        return model(batch.x, batch.adj)

    def loss(self, logits: Tensor, batch: data.Graph) -> Tensor:
        return F.cross_entropy(logits[batch.train_mask], batch.y[batch.train_mask])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        g = self.graph
        pred = model(g.x, g.adj).argmax(-1)
        model.train(was_training)
        return float((pred[g.test_mask] == g.y[g.test_mask]).float().mean())


def graph_task(seed: int = 0) -> GraphTask:
    """A 600-node, 5-class stochastic block model graph; 20 labelled nodes per class."""
    return GraphTask(data.sbm_graph(seed=seed))
