"""FIGR, few-shot image generation with Reptile (Clouâtre & Demers, "FIGR: Few-shot Image Generation with
Reptile", 2019).

A Wasserstein GAN with gradient penalty (Gulrajani et al. 2017) whose generator and critic are meta-learned with
Reptile: a meta-training task is one character's few images; copies of both networks train on them for
``inner_steps`` alternating Adam steps of the critic and the generator, and the initialisation moves towards the
adapted weights (theta += eps * (theta' - theta): the outer optimiser's SGD step on the gradient theta - theta', as
:mod:`metacli.algorithms.reptile` hands it over). Given a few images of an unseen character, the same inner loop,
``test_inner_steps`` long, adapts the networks and the generator draws new samples of it
(``eval.protocol=generative``, :mod:`metacli.generative`).

A training step's logged ``accuracy`` is the adapted critic's: the fraction of the task's real images it scores
above the mean of generated ones.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import reptile_pull
from metacli.data.trajectories import TrajectoryBatch


class Generator(nn.Module):
    """Noise ``[B, z_dim]`` to images ``[B, C, S, S]`` with values in [0, 1]: a linear layer to a ``S/4`` map, two
    transposed convolutions doubling it (DCGAN's shape)."""

    def __init__(self, z_dim: int, hidden: int, channels: int, image_size: int) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"FIGR's generator doubles a map twice: dataset.image_size must be a multiple of 4, got "
                             f"{image_size}")
        self.z_dim, self.side = z_dim, image_size // 4
        self.project = nn.Linear(z_dim, 2 * hidden * self.side ** 2)
        self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * hidden, hidden, 4, 2, 1), nn.ReLU(),
                                nn.ConvTranspose2d(hidden, channels, 4, 2, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.project(z).view(len(z), -1, self.side, self.side))


class Critic(nn.Module):
    """Images in [0, 1] to one score each: two strided convolutions and a linear layer, no normalisation across the
    batch (the gradient penalty treats each image on its own)."""

    def __init__(self, hidden: int, channels: int, image_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 4, 2, 1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(hidden, 2 * hidden, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
        self.score = nn.Linear(2 * hidden * (image_size // 4) ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(x)).squeeze(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator
                     ) -> torch.Tensor:
    """WGAN-GP's penalty: (|grad critic| - 1)^2 at random points between real and generated images."""
    mix = torch.rand(len(real), 1, 1, 1, generator=generator).to(real)
    points = (mix * real + (1 - mix) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(points).sum(), points, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


class FIGR(FewShotLearner):
    """A WGAN-GP meta-learned by Reptile for generating a character from a few of its images.

    Args:
        backbone, n_way, bn_mode: accepted as every learner's, unused: FIGR's networks are its own.
        image_size, channels: the dataset's (filled in by the builder).
        z_dim, hidden: the noise size and the networks' width.
        shots: images of a character a task gives (the paper's 4).
        inner_steps, test_inner_steps: critic-and-generator steps on a task in meta-training and when adapting to
            an unseen character.
        inner_lr, betas: the inner Adam's (WGAN-GP's betas (0.5, 0.9); its rate 1e-4 adapts too little in the
            steps a CPU affords).
        penalty: the gradient penalty's weight (WGAN-GP's 10).
        seed: seeds each adaptation's noise, so that adapting to the same images gives the same generator.
    """

    training_data = "trajectories"
    training_step = "whole_batch"
    generates = True

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive", image_size: int = 28,
                 channels: int = 1, z_dim: int = 64, hidden: int = 32, shots: int = 4, inner_steps: int = 10,
                 test_inner_steps: int = 50, inner_lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.9),
                 penalty: float = 10.0, seed: int = 0) -> None:
        super().__init__(None, n_way, bn_mode)
        if shots < 1 or inner_steps < 1 or test_inner_steps < 0 or inner_lr <= 0 or penalty < 0:
            raise ValueError(f"FIGR needs shots>=1, inner_steps>=1, test_inner_steps>=0, inner_lr>0 and penalty>=0; "
                             f"got {shots}, {inner_steps}, {test_inner_steps}, {inner_lr} and {penalty}")
        self.generator = Generator(z_dim, hidden, channels, image_size)
        self.critic = Critic(hidden, channels, image_size)
        self.trajectory = (1, shots, 0, 0)  # one character's images a task, nothing held out
        self.inner_steps, self.test_inner_steps, self.inner_lr, self.betas = inner_steps, test_inner_steps, inner_lr, \
            tuple(betas)
        self.penalty, self.seed = penalty, seed

    def adapt(self, images: torch.Tensor, steps: int, generator: torch.Generator) -> tuple[Generator, Critic, float]:
        """Copies of the generator and critic after ``steps`` WGAN-GP steps on ``images`` (``[K, C, H, W]`` in
        [0, 1]), and the adapted critic's accuracy at telling them from generated ones."""
        gen, critic = copy.deepcopy(self.generator), copy.deepcopy(self.critic)
        gen_opt = torch.optim.Adam(gen.parameters(), lr=self.inner_lr, betas=self.betas)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=self.inner_lr, betas=self.betas)
        with torch.enable_grad():
            for _ in range(steps):
                fake = gen(self.noise(len(images), generator, images.device))
                critic_opt.zero_grad(set_to_none=True)
                loss = critic(fake.detach()).mean() - critic(images).mean()
                (loss + self.penalty * gradient_penalty(critic, images, fake.detach(), generator)).backward()
                critic_opt.step()
                gen_opt.zero_grad(set_to_none=True)
                (-critic(gen(self.noise(len(images), generator, images.device))).mean()).backward()
                gen_opt.step()
        with torch.no_grad():
            fake_scores = critic(gen(self.noise(len(images), generator, images.device)))
            accuracy = (critic(images) > fake_scores.mean()).float().mean().item()
        return gen, critic, accuracy

    def draw(self, images: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` new images of the character of ``images`` (the generator adapted to them), and ``count`` of the
        unadapted generator from the same noise; the adaptation's noise is seeded by ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        adapted, _, _ = self.adapt(images, self.test_inner_steps, generator)
        noise = self.noise(count, generator, images.device)
        with torch.no_grad():
            return adapted(noise), self.generator(noise)

    def noise(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randn(count, self.generator.z_dim, generator=generator).to(device)

    def batch_loss(self, batch: TrajectoryBatch) -> tuple[torch.Tensor, torch.Tensor]:
        distances, scores = [], []
        for task in batch:
            # The task's noise comes from the run's RNG (seeded, checkpointed), so a resumed run repeats itself.
            generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))
            gen, critic, accuracy = self.adapt(task.stream_x, self.inner_steps, generator)
            adapted = {**{f"generator.{n}": p for n, p in gen.named_parameters()},
                       **{f"critic.{n}": p for n, p in critic.named_parameters()}}
            distances.append(reptile_pull(self, adapted))
            scores.append(torch.tensor(accuracy))
        return torch.stack(distances), torch.stack(scores)

    def predict(self, task, training: bool) -> torch.Tensor:
        raise NotImplementedError("FIGR generates images; it is scored with eval.protocol=generative")
