"""MAML (Finn et al. 2017) on Omniglot in the style of torchmeta's examples/maml/train.py, on metacli.torchmeta.

torchmeta's version needs its MetaModule layers to run a model on adapted parameters; this one runs a plain
``nn.Module`` on them with ``torch.func.functional_call``. Everything else (the helper, the loader, the batches of
``"train"``/``"test"`` pairs, the loop over a batch's tasks) is written as torchmeta's users write it.

    python examples/torchmeta/maml.py ../shared/data --num-batches 200
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metacli.torchmeta.datasets.helpers import omniglot
from metacli.torchmeta.utils.data import BatchMetaDataLoader


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2))


class ConvolutionalNeuralNetwork(nn.Module):
    def __init__(self, in_channels: int, out_features: int, hidden_size: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_block(in_channels, hidden_size), conv_block(hidden_size, hidden_size),
                                      conv_block(hidden_size, hidden_size), conv_block(hidden_size, hidden_size))
        self.classifier = nn.Linear(hidden_size, out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs).flatten(1))


def adapted(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, step_size: float, steps: int,
            first_order: bool) -> dict[str, torch.Tensor]:
    """The model's parameters after ``steps`` gradient steps on one task's train images."""
    params = dict(model.named_parameters())
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (inputs,)), targets)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
        params = {name: p - step_size * g for (name, p), g in zip(params.items(), grads)}
    return params


def run(batches, model: nn.Module, args, num_batches: int, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Meta-train on ``num_batches`` of ``batches`` (with ``optimizer``) or only score them; the mean query
    accuracy."""
    accuracies = []
    for batch_index, batch in enumerate(batches):
        train_inputs, train_targets = batch["train"]
        test_inputs, test_targets = batch["test"]
        outer_loss = torch.tensor(0.0)
        for task in range(train_inputs.shape[0]):
            params = adapted(model, train_inputs[task], train_targets[task], args.step_size, args.inner_steps,
                             args.first_order or optimizer is None)
            logits = functional_call(model, params, (test_inputs[task],))
            outer_loss = outer_loss + F.cross_entropy(logits, test_targets[task])
            accuracies.append((logits.argmax(-1) == test_targets[task]).float().mean().item())
        if optimizer is not None:
            optimizer.zero_grad()
            (outer_loss / train_inputs.shape[0]).backward()
            optimizer.step()
            if (batch_index + 1) % 10 == 0:
                recent = accuracies[-10 * args.batch_size:]
                print(f"batch {batch_index + 1}: accuracy {sum(recent) / len(recent):.3f}")
        if batch_index + 1 >= num_batches:
            break
    return sum(accuracies) / len(accuracies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data")
    parser.add_argument("--num-ways", type=int, default=5)
    parser.add_argument("--num-shots", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-batches", type=int, default=100)
    parser.add_argument("--step-size", type=float, default=0.4)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = ConvolutionalNeuralNetwork(1, args.num_ways, args.hidden_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, test_shots=15, meta_train=True,
                     download=True, seed=args.seed)
    run(BatchMetaDataLoader(train, batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed)),
        model, args, args.num_batches, optimizer)
    # Held-out characters: the meta-test split, tasks fixed by their own seed.
    test = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, test_shots=15, meta_test=True, seed=1)
    accuracy = run(BatchMetaDataLoader(test, batch_size=args.batch_size, generator=torch.Generator().manual_seed(1)),
                   model, args, 10)
    print(f"meta-test accuracy over {10 * args.batch_size} tasks: {accuracy:.3f}")


if __name__ == "__main__":
    main()
