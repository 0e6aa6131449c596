"""Categorical VAE (SPEC §6.2): conv encoder, posterior head with 1 % unimix,
straight-through one-hot sample, transposed-conv decoder.

Images arrive as uint8 ``[N, H, W, C]`` exactly as stored in the replay buffer. Permuting
to ``[N, C, H, W]`` without a copy gives a channels-last tensor, the fast memory format for
CPU (oneDNN) and GPU (cuDNN) convolutions; the module keeps its conv weights channels-last
too.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from mow.models.heads import DistHead, concat_condition
from mow.models.linear import Linear


def images_to_float(obs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [0, 1], channels-last in memory."""
    if obs.dim() != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {tuple(obs.shape)}")
    return obs.permute(0, 3, 1, 2).float().div_(255.0)


def _conv_block(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convs (no bias), each followed by BatchNorm and ReLU; then flatten.

    In eval mode BatchNorm is a fixed per-channel affine map, so it is folded into the
    convolution's weights and bias on the fly: one pass less over the (large) activations
    when thousands of context frames are encoded for imagination. Training mode uses the
    plain conv -> BatchNorm (batch statistics) -> ReLU sequence.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
            for c_in, c_out in itertools.pairwise(widths)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``[N, C, H, W]`` -> flat features ``[N, channels[-1] * (H / 2^k)^2]``."""
        x = images
        for conv, norm in zip(self.convs, self.norms):
            if norm.training:
                x = F.relu(norm(conv(x)), inplace=True)
            else:
                scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
                weight = conv.weight * scale[:, None, None, None]
                bias = norm.bias - norm.running_mean * scale
                x = F.conv2d(x, weight, bias, conv.stride, conv.padding).relu_()
        return x.flatten(1)


class CategoricalVAE(nn.Module):
    """Image <-> ``stoch`` x ``classes`` categorical latent.

    ``encode`` gives unimixed posterior logits, ``sample`` a straight-through one-hot
    sample flattened to ``stoch * classes``, ``decode`` the reconstructed image (no output
    activation). ``cond_dim`` > 0 adds a conditioning vector (MoW's task embedding) to the
    posterior head's and the decoder's input; 0 is STORM.
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: int = 3,
        encoder_channels: tuple[int, ...] = (32, 64, 128, 256),
        stoch: int = 32,
        classes: int = 32,
        unimix: float = 0.01,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        downsample = 2 ** len(encoder_channels)
        if image_size % downsample:
            raise ValueError(
                f"image_size {image_size} is not divisible by 2^{len(encoder_channels)}"
            )
        self.image_size, self.channels = image_size, channels
        self.stoch, self.classes = stoch, classes
        self.latent_dim = stoch * classes
        self.final_size = image_size // downsample
        self.final_channels = encoder_channels[-1]
        feature_dim = self.final_channels * self.final_size**2

        self.encoder = ConvEncoder(channels, encoder_channels)
        self.posterior_head = DistHead(feature_dim, stoch, classes, unimix, cond_dim)

        self.decoder_stem = Linear(self.latent_dim + cond_dim, feature_dim, bias=False)
        self.decoder_stem_norm = nn.BatchNorm2d(self.final_channels)
        decoder: list[nn.Module] = [nn.ReLU(inplace=True)]
        reversed_channels = encoder_channels[::-1]
        for in_ch, out_ch in itertools.pairwise(reversed_channels):
            deconv = nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False)
            decoder += _conv_block(deconv, out_ch)
        decoder.append(nn.ConvTranspose2d(encoder_channels[0], channels, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(*decoder)
        self.to(memory_format=torch.channels_last)

    def encode(self, obs: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 ``[N, H, W, C]`` -> float32 posterior logits ``[N, stoch, classes]`` (unimixed)."""
        return self.encode_images(images_to_float(obs), cond)

    def encode_images(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Like :meth:`encode` for images already converted by :func:`images_to_float`."""
        return self.posterior_head(self.encoder(images), cond)

    @staticmethod
    def sample(logits: torch.Tensor) -> torch.Tensor:
        """One-hot sample with straight-through gradient: ``[N, stoch, classes]`` -> ``[N, stoch*classes]``.

        The sample is drawn with the Gumbel-max trick (one argmax, no multinomial call);
        the forward value is exactly one-hot and the gradient is that of the probabilities.
        """
        logits = logits.float()
        uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
        index = (logits - torch.log(-torch.log(uniform))).argmax(dim=-1)  # Gumbel-max
        one_hot = torch.zeros_like(logits).scatter_(-1, index.unsqueeze(-1), 1.0)
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return one_hot.flatten(-2)  # exact one-hot; the gradient term would be zero
        probs = torch.softmax(logits, dim=-1)
        return (one_hot + probs - probs.detach()).flatten(-2)

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Flat latent ``[N, stoch*classes]`` -> image ``[N, C, H, W]`` (channels-last, unbounded)."""
        x = self.decoder_stem(concat_condition(z, cond))
        x = x.view(-1, self.final_channels, self.final_size, self.final_size)
        x = self.decoder_stem_norm(x.contiguous(memory_format=torch.channels_last))
        return self.decoder(x)
