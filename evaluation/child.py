"""The child network every candidate update rule trains (Bello et al. 2017, section 4.2).

"A small two layer 3x3 ConvNet ... 32 filters with ReLU activations and batch normalization
applied after each convolutional layer." The paper says nothing about the head. We put a 2×2
max-pool after each convolution and end with flatten + one linear layer:

    x → conv3×3(32) → BN → maxpool2×2 → ReLU → conv3×3(32) → BN → maxpool2×2 → ReLU → linear

Why pooling (measured, see ``docs/evaluation.md``): with a global-average-pool head the net
learns too slowly for 5 epochs (Fashion-MNIST rewards 0.20–0.73, Adam collapses) and costs twice as
much time; with the pooled head every standard optimizer reaches 0.87–0.88, so rewards separate
good rules from bad ones.

Exact rewrites of the textbook ``conv → BN → ReLU → pool``, cheaper and with the same function
and gradients (up to float rounding):

* ReLU after the pool: ``max(relu(a), relu(b)) = relu(max(a, b))``, so the ReLU touches 4× fewer
  values;
* no convolution bias: batch norm subtracts the per-channel batch mean, so a bias before it has no
  effect on the output and gets a zero gradient;
* (in :class:`StackedChild`) the first convolution and its batch norm as one matmul of the image
  patches, the batch statistics computed from the patches' covariance (see ``_conv_bn1``).

:class:`ChildNet` is the readable ``nn.Module``. :class:`StackedChild` is the same network as a
functional model that holds ``K`` independent copies in one flat parameter tensor ``[K, P]``: the
first layer is one matmul for all K (the input batch is shared), the second convolution a grouped
convolution, batch norm is per channel anyway, and the heads are one batched matmul. The evaluator
trains one copy on the CPU and many (candidates × learning rates) at once on a GPU; either way an
optimizer sees a model's parameters as one flat tensor, which is exact for the element-wise update
rules of the DSL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WIDTH = 32
"""Filters in each convolution (the paper's 32)."""
KERNEL = 3
POOL = 2
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
"""PyTorch's batch-norm defaults (TensorFlow's would be momentum 0.01, eps 1e-3)."""


def pooled_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size after the two 2×2 max-pools (floor, as ``max_pool2d`` does)."""
    return height // POOL // POOL, width // POOL // POOL


class ChildNet(nn.Module):
    """The child network for ``shape = (C, H, W)`` images and ``classes`` outputs."""

    def __init__(self, shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        self.shape = shape
        channels, height, width = shape
        self.conv1 = nn.Conv2d(channels, WIDTH, KERNEL, padding=KERNEL // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTH, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(WIDTH, WIDTH, KERNEL, padding=KERNEL // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(WIDTH, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc = nn.Linear(WIDTH * math.prod(pooled_size(height, width)), classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.bn1(self.conv1(x)), POOL).relu_()
        x = F.max_pool2d(self.bn2(self.conv2(x)), POOL).relu_()
        return self.fc(x.flatten(1))


def init_child(shape: tuple[int, int, int], classes: int, seed: int) -> ChildNet:
    """A :class:`ChildNet` with PyTorch's default initialisation drawn from ``seed`` (the global
    RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ChildNet(shape, classes)


def image_patches(x: Tensor) -> Tensor:
    """The zero-padded 3×3 patch around every pixel, then a 1: ``[B·H·W, C·9 + 1]``, the first
    C·9 columns ordered like a flattened conv filter ``[C, 3, 3]``. Nine slice copies: 2× faster
    here than one copy from an ``unfold`` view, 5× faster than ``F.unfold``."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (KERNEL // 2,) * 4).permute(0, 2, 3, 1)  # [B, H+2, W+2, C]
    patches = x.new_empty(batch, height, width, channels * KERNEL * KERNEL + 1)
    patches[..., -1] = 1
    taps = patches[..., :-1].unflatten(-1, (channels, KERNEL * KERNEL))
    for i in range(KERNEL):
        for j in range(KERNEL):
            taps[..., i * KERNEL + j] = padded[:, i : i + height, j : j + width]
    return patches.flatten(0, 2)


def _moments(patches: Tensor) -> Tensor:
    """``[[E ppᵀ, E p], [E pᵀ, 1]]`` of the patch rows ``[p, 1]``, in float32."""
    samples = patches.float()
    return samples.T @ samples / len(samples)


def patch_moments(x: Tensor) -> Tensor:
    """The first batch norm's batch statistics of the images ``x`` before any parameter enters:
    ``[[E ppᵀ, E p], [E pᵀ, 1]]`` over the patches of :func:`image_patches` (``[C·9+1]²``,
    float32). :class:`StackedChild` computes exactly this when it is not given."""
    return _moments(image_patches(x))


class StackedChild:
    """``copies`` independent :class:`ChildNet` models trained as one.

    ``params`` is a leaf tensor ``[K, P]``: row k holds model k's parameters in
    ``ChildNet.named_parameters()`` order, so ``params[a:b]`` (and its gradient) is a contiguous
    view of models a..b−1 for an optimizer. ``running`` holds the batch-norm statistics as
    ``[layer, mean/var, K, 32]``.
    """

    def __init__(
        self,
        child: ChildNet,
        copies: int,
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        self.copies = copies
        self.memory_format = memory_format
        self.shape = child.shape
        self.classes = child.fc.out_features
        self.shapes = {name: p.shape for name, p in child.named_parameters()}
        flat = torch.cat([p.detach().flatten() for p in child.parameters()])
        self.params = flat.to(device).repeat(copies, 1).requires_grad_(True)
        stats = [torch.stack([bn.running_mean, bn.running_var]) for bn in (child.bn1, child.bn2)]
        self.running = torch.stack(stats)[:, :, None, :].repeat(1, 1, copies, 1).to(device)
        self._initial = (self.params.detach().clone(), self.running.clone())

    def reset(self) -> None:
        """Restore the initial parameters and statistics (same init for every run)."""
        with torch.no_grad():
            self.params.copy_(self._initial[0])
            self.running.copy_(self._initial[1])
        self.params.grad = None

    def _weights(self) -> dict[str, Tensor]:
        """Each parameter across the K models, shaped ``[K, *shape]`` (views of ``params``)."""
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        parts = self.params.split(sizes, dim=1)
        return {
            name: part.view(self.copies, *shape)
            for (name, shape), part in zip(self.shapes.items(), parts, strict=True)
        }

    def forward(self, x: Tensor, train: bool, moments: Tensor | None = None) -> Tensor:
        """Logits ``[K, B, classes]`` of the K models on the shared batch ``x`` ``[B, C, H, W]``
        (``moments``: :func:`patch_moments` of ``x``, computed here when not given)."""
        k, w = self.copies, self._weights()
        h = self._conv_bn1(x, w, train, moments).contiguous(memory_format=self.memory_format)
        h = F.max_pool2d(h, POOL).relu_()
        h = F.conv2d(h, w["conv2.weight"].flatten(0, 1), padding=KERNEL // 2, groups=k)
        mean, var = self.running[1].flatten(1)
        scale, shift = w["bn2.weight"].flatten(), w["bn2.bias"].flatten()
        h = F.batch_norm(h, mean, var, scale, shift, train, BN_MOMENTUM, BN_EPS)
        h = F.max_pool2d(h, POOL).relu_()
        features = h.unflatten(1, (k, WIDTH)).flatten(2).transpose(0, 1)  # [K, B, F]
        return torch.baddbmm(w["fc.bias"][:, None], features, w["fc.weight"].transpose(1, 2))

    def _conv_bn1(
        self, x: Tensor, w: dict[str, Tensor], train: bool, moments: Tensor | None
    ) -> Tensor:
        r"""conv1 then BN1 of all K models as one matmul of the image patches: an exact rewrite.

        With patches :math:`p` (``[B·H·W, C·9]``, shared by the models) and filters :math:`W`
        (``[K·32, C·9]``) the convolution is :math:`y = pW^\top`, so its batch statistics are
        :math:`\mu_y = W\mu_p` and :math:`\sigma_y^2 = \operatorname{diag}(W\Sigma_p W^\top)`
        (:math:`\mu_p, \Sigma_p`: the patches' mean and C·9 × C·9 covariance, from one small
        matmul) and BN folds into the matmul:
        :math:`\gamma (y - \mu_y)/\sqrt{\sigma_y^2 + \epsilon} + \beta = [p, 1] [W', b']^\top`.
        Autograd differentiates through :math:`\mu_y, \sigma_y^2` as BN's backward does. The
        full-resolution activation is written once and read once (the pool), its gradient written
        once and read once (the matmul): no separate BN passes. Statistics in float32, the
        big matmul in the autocast dtype. The patch moments depend on the batch alone (not on
        the parameters): the evaluator passes them in, computed once per batch of an epoch for
        every run that sees it (:func:`patch_moments`, the same numbers). Returns
        ``[B, K·32, H, W]`` in channels-last memory.
        """
        batch, channels, height, width = x.shape
        patches = image_patches(x)
        filters = w["conv1.weight"].reshape(self.copies * WIDTH, channels * KERNEL * KERNEL)
        running_mean, running_var = self.running[0].flatten(1)
        with torch.autocast(x.device.type, enabled=False):  # statistics in float32
            if train:
                moments = _moments(patches) if moments is None else moments
                mean_p, second_p = moments[:-1, -1], moments[:-1, :-1]
                covariance = second_p - torch.outer(mean_p, mean_p)
                mean = filters @ mean_p
                var = ((filters @ covariance) * filters).sum(dim=1)
                with torch.no_grad():  # the running variance is unbiased, as in BN
                    running_mean.lerp_(mean, BN_MOMENTUM)
                    running_var.lerp_(var * len(patches) / (len(patches) - 1), BN_MOMENTUM)
            else:
                mean, var = running_mean, running_var
            scale = w["bn1.weight"].flatten() * torch.rsqrt(var + BN_EPS)
            shift = w["bn1.bias"].flatten() - mean * scale
            folded = torch.cat([filters * scale[:, None], shift[:, None]], dim=1)  # [K·32, C·9+1]
        y = patches @ folded.T
        return y.view(batch, height, width, -1).permute(0, 3, 1, 2)

    def losses(self, x: Tensor, y: Tensor, moments: Tensor | None = None) -> Tensor:
        """Per-model mean cross-entropy ``[K]`` on the batch (train mode: updates BN statistics;
        ``moments``: :func:`patch_moments` of ``x``, computed here when not given)."""
        logits = self.forward(x, train=True, moments=moments)
        per_example = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.copies), reduction="none")
        return per_example.view(self.copies, -1).mean(dim=1)

    def correct(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-model number of correct predictions ``[K]`` (eval mode: running statistics)."""
        return (self.forward(x, train=False).argmax(dim=-1) == y).sum(dim=1)

    def model(self, index: int) -> ChildNet:
        """Model ``index`` as a :class:`ChildNet` (CPU, eval mode), e.g. to inspect or reuse it."""
        child = ChildNet(self.shape, self.classes).eval()
        weights = {name: value[index] for name, value in self._weights().items()}
        with torch.no_grad():
            for name, parameter in child.named_parameters():
                parameter.copy_(weights[name])
            for layer, bn in enumerate((child.bn1, child.bn2)):
                bn.running_mean.copy_(self.running[layer, 0, index])
                bn.running_var.copy_(self.running[layer, 1, index])
        return child
