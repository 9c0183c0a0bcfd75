"""The correlation-driven similarity network of Chen et al. (ISBI 2024), in our own words.

Data flow for one (X-ray, DRR) pair (see docs/network.md for the full description)::

    xray, drr (B, 1, H, W)
      -> resize to ``input_size`` and standardise each image (zero mean, unit std)
      -> shared shallow feature extractor SFE (a "global Poolformer")      Fx, Fm
      -> global / low-frequency branch G (residual fast Fourier convolution)   G_x(Fx), G_m(Fm)
         local / high-frequency branch L (3-layer invertible coupling net)    L_x(Fx), L_m(Fm)
         (separate G and L weights for the X-ray and the DRR side)
      -> difference features Phi_g = (G_x(Fx) - G_m(Fm))^2, Phi_l = (L_x(Fx) - L_m(Fm))^2
      -> one similarity head per branch: value(Phi) * sigmoid(gate(Phi))
      -> combined into one score per pair (default: sum of the two branch scores)

Convention: the output is a *distance-like score*: lower means better aligned. Training
(``losses.appro_loss``) makes its gradient with respect to the pose point away from the true
pose, so gradient *descent* on the score moves a pose towards the truth.

Everything here is plain PyTorch, twice differentiable (the L_appro loss differentiates the
gradient of the score with respect to the pose), and free of batch statistics: the norms are
GroupNorm / InstanceNorm, so training and inference behave identically and a batch of one
works.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

#: How images are normalised before the network sees them; stored in every config.
NORMALISATION = "per-image standardisation: (img - mean(img)) / sqrt(var(img) + eps^2), eps = 1e-6"

PRESETS = ("compact", "paper")


# ============================================================================================
# Configuration


@dataclass(frozen=True)
class NetConfig:
    """Every size of the network; serialisable to JSON (``to_dict`` / ``from_dict``).

    ``input_size``: images are bilinearly resized to input_size x input_size before the SFE
    (skipped when they already have that size). ``head_pool``: the difference features are
    average-pooled to head_pool x head_pool before the heads; ``None`` flattens them whole
    (the paper's 64 x 16 x 16 = 16384 inputs at 256 x 256).
    """

    preset: str = "compact"
    input_size: int = 64
    stem_channels: int = 8
    stage_channels: tuple[int, ...] = (16, 32)
    blocks_per_stage: int = 2
    mlp_ratio: float = 2.0
    layer_scale_init: float = 0.1
    ffc_global_ratio: float = 0.5
    ffc_blocks: int = 1
    local_fourier_unit: bool = True
    inn_layers: int = 3
    inn_expansion: int = 2
    inn_scale_clamp: float = 2.0
    head_pool: int | None = 4
    head_hidden: tuple[int, ...] = (64,)
    combine: str = "sum"
    adapter: bool = False
    adapter_channels: tuple[int, ...] = (4, 8, 16, 8, 4, 3)
    adapter_reduce: str = "mean"
    normalisation: str = NORMALISATION
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_channels", tuple(int(c) for c in self.stage_channels))
        object.__setattr__(self, "head_hidden", tuple(int(c) for c in self.head_hidden))
        object.__setattr__(self, "adapter_channels", tuple(int(c) for c in self.adapter_channels))
        if self.preset not in PRESETS:
            raise ValueError(f"unknown network preset {self.preset!r}; choose one of {PRESETS}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be at least 8 pixels, got {self.input_size}")
        if not self.stage_channels:
            raise ValueError("stage_channels needs at least one stage")
        if min((self.stem_channels,) + self.stage_channels) < 1:
            raise ValueError("channel counts must be positive")
        c = self.feature_channels
        if c % 4:
            raise ValueError(f"the last stage needs a multiple of 4 channels (FFC split + INN halves), got {c}")
        if self.input_size % (2 ** len(self.stage_channels)):
            raise ValueError(
                f"input_size {self.input_size} must be divisible by 2^{len(self.stage_channels)} "
                "(one halving per SFE stage)"
            )
        if not 0.0 < self.ffc_global_ratio < 1.0:
            raise ValueError("ffc_global_ratio must lie strictly between 0 and 1")
        if self.combine not in ("sum", "mean", "learned"):
            raise ValueError(f"combine must be 'sum', 'mean' or 'learned', got {self.combine!r}")
        if self.adapter_reduce not in ("mean", "per_channel"):
            raise ValueError(f"adapter_reduce must be 'mean' or 'per_channel', got {self.adapter_reduce!r}")
        if self.head_pool is not None and self.head_pool > self.feature_size:
            raise ValueError(f"head_pool {self.head_pool} exceeds the feature map size {self.feature_size}")
        if self.inn_layers < 1 or self.inn_expansion < 1:
            raise ValueError("inn_layers and inn_expansion must be at least 1")

    @property
    def feature_channels(self) -> int:
        return self.stage_channels[-1]

    @property
    def feature_size(self) -> int:
        return self.input_size // (2 ** len(self.stage_channels))

    @property
    def head_inputs(self) -> int:
        side = self.feature_size if self.head_pool is None else self.head_pool
        return self.feature_channels * side * side

    @property
    def image_channels(self) -> int:
        """Channels of the DRR the network receives (3 only for a per-channel adapter)."""
        return 3 if (self.adapter and self.adapter_reduce == "per_channel") else 1

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a network config must be a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown network config keys {unknown}")
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in ("stage_channels", "head_hidden", "adapter_channels"):
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                    raise ValueError(f"config key {k!r} must be a list of integers, got {v!r}")
                v = tuple(v)
            elif k == "head_pool":
                if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                    raise ValueError(f"config key 'head_pool' must be an integer or null, got {v!r}")
            elif k in ("preset", "combine", "adapter_reduce", "normalisation"):
                if not isinstance(v, str):
                    raise ValueError(f"config key {k!r} must be a string, got {v!r}")
            elif k in ("adapter", "local_fourier_unit"):
                if not isinstance(v, bool):
                    raise ValueError(f"config key {k!r} must be true or false, got {v!r}")
            elif k in ("input_size", "stem_channels", "blocks_per_stage", "ffc_blocks", "inn_layers", "inn_expansion"):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ValueError(f"config key {k!r} must be an integer, got {v!r}")
            else:
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise ValueError(f"config key {k!r} must be a finite number, got {v!r}")
            kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def from_preset(cls, preset: str = "compact", **overrides) -> "NetConfig":
        """``compact``: trains on a laptop CPU (64 x 64 inputs, SFE 8 -> 16 -> 32, pooled heads).
        ``paper``: the published sizes (256 x 256 inputs, SFE 8 -> 16 -> 32 -> 64 -> 64, heads
        16384 -> 8192 -> 4096 -> 2048 -> 1024, about 178 M parameters per head)."""
        if preset == "compact":
            base = cls()
        elif preset == "paper":
            base = cls(
                preset="paper",
                input_size=256,
                stem_channels=8,
                stage_channels=(16, 32, 64, 64),
                layer_scale_init=1e-5,
                head_pool=None,
                head_hidden=(8192, 4096, 2048, 1024),
            )
        else:
            raise ValueError(f"unknown network preset {preset!r}; choose one of {PRESETS}")
        return replace(base, **overrides) if overrides else base


# ============================================================================================
# Input normalisation


def standardise(img: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit standard deviation per image (over C, H, W); differentiable."""
    mean = img.mean(dim=(-3, -2, -1), keepdim=True)
    var = (img - mean).pow(2).mean(dim=(-3, -2, -1), keepdim=True)
    return (img - mean) / torch.sqrt(var + eps * eps)


# ============================================================================================
# Optional ProST volume adapter


class VolumeAdapter(nn.Module):
    """3D CNN (1 -> 4 -> 8 -> 16 -> 8 -> 4 -> 3 channels, 3x3x3 convs, ReLU between them) whose
    output is added to the CT repeated to 3 channels.

    Our projector renders one channel, so ``reduce='mean'`` returns the mean of the 3 adapted
    channels as one volume (rendering that equals the mean of the 3 per-channel DRRs, because
    the line integral is linear, at a third of the cost); ``reduce='per_channel'`` returns all
    3 channels, to be rendered one by one into a 3-channel DRR (then the X-ray is repeated to
    3 channels in front of the shared SFE).
    """

    def __init__(self, channels: Sequence[int] = (4, 8, 16, 8, 4, 3), reduce: str = "mean") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            layers.append(nn.Conv3d(c_in, c, 3, padding=1))
            if i < len(channels) - 1:
                layers.append(nn.ReLU())
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out_channels = c_in
        self.reduce = reduce
        # Start as the identity: the last conv adds nothing until it is trained.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, voxels: Tensor) -> Tensor:
        """(K, J, I) voxels -> (K, J, I) (mean) or (3, K, J, I) (per_channel)."""
        x = voxels[None, None]
        out = self.net(x)[0] + x[0].expand(self.out_channels, *voxels.shape)
        return out.mean(0) if self.reduce == "mean" else out


# ============================================================================================
# Shared shallow feature extractor: a "global Poolformer"


class ConvNormAct(nn.Sequential):
    """3x3 conv + InstanceNorm (affine) + ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out, affine=True), nn.ReLU())


class GlobalPoolMixer(nn.Module):
    """Poolformer's token mixer with a *global* window: the mean over the whole map, broadcast
    back to every position, minus the input (the block adds the input back in its residual)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1), keepdim=True) - x


class PoolformerBlock(nn.Module):
    """x + ls1 * mixer(norm(x)); then x + ls2 * MLP(norm(x)), the MLP being 1x1 convs C -> r C -> C."""

    def __init__(self, channels: int, mlp_ratio: float = 2.0, layer_scale_init: float = 0.1) -> None:
        super().__init__()
        hidden = max(1, int(round(channels * mlp_ratio)))
        self.norm1 = nn.GroupNorm(1, channels)
        self.mixer = GlobalPoolMixer()
        self.norm2 = nn.GroupNorm(1, channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, channels, 1))
        self.scale1 = nn.Parameter(torch.full((channels, 1, 1), float(layer_scale_init)))
        self.scale2 = nn.Parameter(torch.full((channels, 1, 1), float(layer_scale_init)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.scale1 * self.mixer(self.norm1(x))
        return x + self.scale2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Stride-2 patch embedding: 3x3 conv with stride 2 (halves H and W), then GroupNorm."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(1, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class ShallowFeatureExtractor(nn.Module):
    """Two 3x3 conv + InstanceNorm + ReLU layers, then one stage per entry of ``stages``: a
    stride-2 patch embedding followed by ``blocks`` global-Poolformer blocks."""

    def __init__(
        self, in_channels: int, stem: int, stages: Sequence[int], blocks: int = 2, mlp_ratio: float = 2.0,
        layer_scale_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(in_channels, stem), ConvNormAct(stem, stem))
        mods = []
        c_prev = stem
        for c in stages:
            mods.append(PatchEmbed(c_prev, c))
            mods.extend(PoolformerBlock(c, mlp_ratio, layer_scale_init) for _ in range(blocks))
            c_prev = c
        self.stages = nn.Sequential(*mods)
        self.out_channels = c_prev

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


# ============================================================================================
# Global / low-frequency branch: residual fast Fourier convolution


class FourierUnit(nn.Module):
    """Convolution in the frequency domain: rfft2 (orthonormal), real and imaginary parts
    stacked as channels, 1x1 conv + GroupNorm + ReLU there, back to a complex spectrum, irfft2.
    A 1x1 conv on the spectrum touches every spatial position at once: a global receptive field."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * c_in, 2 * c_out, 1, bias=False)
        self.norm = nn.GroupNorm(1, 2 * c_out)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        spec = torch.fft.rfft2(x, norm="ortho")  # (B, C, H, W//2 + 1) complex
        z = torch.cat([spec.real, spec.imag], dim=1)
        z = F.relu(self.norm(self.conv(z)))
        re, im = z.chunk(2, dim=1)
        return torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="ortho")


class SpectralTransform(nn.Module):
    """The global path of an FFC: 1x1 reduce to half the channels, a Fourier unit plus a local
    Fourier unit (a quarter of the channels, the map cut into 2 x 2 tiles stacked as channels so
    the FFT sees half-size windows, the result tiled back), summed, then 1x1 back up."""

    def __init__(self, c_in: int, c_out: int, local_fourier_unit: bool = True) -> None:
        super().__init__()
        mid = max(1, c_out // 2)
        self.reduce = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.GroupNorm(1, mid), nn.ReLU())
        self.fu = FourierUnit(mid, mid)
        self.use_lfu = local_fourier_unit
        if self.use_lfu:
            self.lfu_in = max(1, mid // 4)
            self.lfu = FourierUnit(4 * self.lfu_in, mid)
        self.expand = nn.Conv2d(mid, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        out = x + self.fu(x)
        if self.use_lfu:
            h, w = x.shape[-2:]
            if h % 2 or w % 2:
                raise ValueError(f"the local Fourier unit needs an even feature map size, got {h} x {w}")
            xs = x[:, : self.lfu_in]
            # 2 x 2 tiles -> channels: (B, c, H, W) -> (B, 4c, H/2, W/2)
            xs = torch.cat(torch.split(xs, h // 2, dim=-2), dim=1)
            xs = torch.cat(torch.split(xs, w // 2, dim=-1), dim=1)
            xs = self.lfu(xs).repeat(1, 1, 2, 2)
            out = out + xs
        return self.expand(out)


class FFC(nn.Module):
    """Fast Fourier convolution: channels split into a local part (3x3 convs) and a global part
    (spectral transform); four paths local->local, local->global, global->local (3x3 convs) and
    global->global (spectral), then GroupNorm + ReLU on each part."""

    def __init__(self, channels: int, global_ratio: float = 0.5, local_fourier_unit: bool = True, act: bool = True) -> None:
        super().__init__()
        self.c_g = int(round(channels * global_ratio))
        self.c_l = channels - self.c_g
        if self.c_g < 1 or self.c_l < 1:
            raise ValueError(f"FFC with {channels} channels and ratio {global_ratio} leaves an empty part")
        self.l2l = nn.Conv2d(self.c_l, self.c_l, 3, padding=1, padding_mode="reflect", bias=False)
        self.l2g = nn.Conv2d(self.c_l, self.c_g, 3, padding=1, padding_mode="reflect", bias=False)
        self.g2l = nn.Conv2d(self.c_g, self.c_l, 3, padding=1, padding_mode="reflect", bias=False)
        self.g2g = SpectralTransform(self.c_g, self.c_g, local_fourier_unit)
        self.norm_l = nn.GroupNorm(1, self.c_l)
        self.norm_g = nn.GroupNorm(1, self.c_g)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x_l, x_g = x[:, : self.c_l], x[:, self.c_l :]
        y_l = self.l2l(x_l) + self.g2l(x_g)
        y_g = self.l2g(x_l) + self.g2g(x_g)
        return torch.cat([self.act(self.norm_l(y_l)), self.act(self.norm_g(y_g))], dim=1)


class ResidualFFCBlock(nn.Module):
    """x + FFC(FFC(x)): the global / low-frequency branch G."""

    def __init__(self, channels: int, global_ratio: float = 0.5, local_fourier_unit: bool = True) -> None:
        super().__init__()
        self.ffc1 = FFC(channels, global_ratio, local_fourier_unit, act=True)
        self.ffc2 = FFC(channels, global_ratio, local_fourier_unit, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffc2(self.ffc1(x))


class GlobalBranch(nn.Sequential):
    def __init__(self, channels: int, blocks: int = 1, global_ratio: float = 0.5, local_fourier_unit: bool = True):
        super().__init__(*[ResidualFFCBlock(channels, global_ratio, local_fourier_unit) for _ in range(blocks)])


# ============================================================================================
# Local / high-frequency branch: invertible affine-coupling network


class InvertedResidual(nn.Module):
    """MobileNetV2-style bottleneck used as phi, rho and eta: 1x1 expand, ReLU6, 3x3 depthwise
    (reflection padding), ReLU6, 1x1 project. No normalisation, so it is a fixed function of its
    input (what the coupling inverse needs)."""

    def __init__(self, c_in: int, c_out: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.ReLU6(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(hidden, hidden, 3, groups=hidden, bias=False),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class InvertibleConv1x1(nn.Module):
    """Learned invertible channel mixing (Glow's LU parametrisation): W = P L (U + diag(sign e^s)),
    P a fixed permutation, L unit lower-, U strictly upper-triangular. The exponential keeps the
    diagonal away from zero, so W stays invertible whatever the training does; the inverse uses
    triangular solves rather than a general matrix inverse."""

    def __init__(self, channels: int, seed: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
        p, l, u = torch.linalg.lu(q)
        s = torch.diagonal(u)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(l.float())
        self.upper = nn.Parameter(torch.triu(u, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        low = self.lower * self.lower_mask + eye
        up = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm, low, up

    def weight(self) -> Tensor:
        p, low, up = self._factors()
        return p @ low @ up

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight(), x)

    def inverse(self, y: Tensor) -> Tensor:
        p, low, up = self._factors()
        b, c, h, w = y.shape
        rhs = p.T @ y.permute(1, 0, 2, 3).reshape(c, -1)  # W^-1 = U^-1 L^-1 P^T
        z = torch.linalg.solve_triangular(low, rhs, upper=False, unitriangular=True)
        z = torch.linalg.solve_triangular(up, z, upper=True)
        return z.reshape(c, b, h, w).permute(1, 0, 2, 3)


class AffineCouplingLayer(nn.Module):
    """One invertible layer: mix channels (1x1 invertible conv), split into halves (z1, z2),
    z2 <- z2 + phi(z1), then z1 <- z1 * exp(rho(z2)) + eta(z2). The log-scale rho is soft-clamped
    to (-clamp, clamp) with a tanh so exp() cannot overflow."""

    def __init__(self, channels: int, expansion: int = 2, clamp: float = 2.0, seed: int | None = None) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"an affine coupling layer needs an even channel count, got {channels}")
        half = channels // 2
        self.mix = InvertibleConv1x1(channels, seed)
        self.phi = InvertedResidual(half, half, expansion)
        self.rho = InvertedResidual(half, half, expansion)
        self.eta = InvertedResidual(half, half, expansion)
        self.clamp = float(clamp)

    def _log_scale(self, z2: Tensor) -> Tensor:
        return self.clamp * torch.tanh(self.rho(z2) / self.clamp)

    def forward(self, x: Tensor) -> Tensor:
        z1, z2 = self.mix(x).chunk(2, dim=1)
        z2 = z2 + self.phi(z1)
        z1 = z1 * torch.exp(self._log_scale(z2)) + self.eta(z2)
        return torch.cat([z1, z2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        z1, z2 = y.chunk(2, dim=1)
        z1 = (z1 - self.eta(z2)) * torch.exp(-self._log_scale(z2))
        z2 = z2 - self.phi(z1)
        return self.mix.inverse(torch.cat([z1, z2], dim=1))


class InvertibleBranch(nn.Module):
    """The local / high-frequency branch L: a stack of affine coupling layers (3 in the paper);
    exactly invertible, so it keeps every detail of the shallow features."""

    def __init__(self, channels: int, layers: int = 3, expansion: int = 2, clamp: float = 2.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AffineCouplingLayer(channels, expansion, clamp, seed=i) for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


# ============================================================================================
# Similarity evaluation heads


class SimilarityHead(nn.Module):
    """Difference features (B, C, h, w) -> one score per pair: a shared MLP trunk, then a value
    output times the sigmoid of a gate output. Pooling to ``pool`` x ``pool`` first (compact) or
    flattening the whole map (paper)."""

    def __init__(self, in_features: int, hidden: Sequence[int], pool: int | None) -> None:
        super().__init__()
        self.pool = pool
        layers: list[nn.Module] = []
        c = in_features
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU()]
            c = h
        self.trunk = nn.Sequential(*layers)
        self.value = nn.Linear(c, 1)
        self.gate = nn.Linear(c, 1)

    def forward(self, phi: Tensor) -> Tensor:
        if self.pool is not None:
            phi = F.adaptive_avg_pool2d(phi, self.pool)
        h = self.trunk(phi.flatten(1))
        return (self.value(h) * torch.sigmoid(self.gate(h))).squeeze(-1)


# ============================================================================================
# The whole network


class CorrelationNet(nn.Module):
    """``net(xray, drr) -> score (B,)``: lower is better aligned. See the module docstring."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        cfg = config or NetConfig()
        self.config = cfg
        c = cfg.feature_channels
        self.adapter = VolumeAdapter(cfg.adapter_channels, cfg.adapter_reduce) if cfg.adapter else None
        self.sfe = ShallowFeatureExtractor(
            cfg.image_channels, cfg.stem_channels, cfg.stage_channels, cfg.blocks_per_stage, cfg.mlp_ratio,
            cfg.layer_scale_init,
        )
        self.global_xray = GlobalBranch(c, cfg.ffc_blocks, cfg.ffc_global_ratio, cfg.local_fourier_unit)
        self.global_drr = GlobalBranch(c, cfg.ffc_blocks, cfg.ffc_global_ratio, cfg.local_fourier_unit)
        self.local_xray = InvertibleBranch(c, cfg.inn_layers, cfg.inn_expansion, cfg.inn_scale_clamp)
        self.local_drr = InvertibleBranch(c, cfg.inn_layers, cfg.inn_expansion, cfg.inn_scale_clamp)
        self.head_global = SimilarityHead(cfg.head_inputs, cfg.head_hidden, cfg.head_pool)
        self.head_local = SimilarityHead(cfg.head_inputs, cfg.head_hidden, cfg.head_pool)
        if cfg.combine == "learned":
            self.combine_weights = nn.Parameter(torch.ones(2))

    # ---- inputs -------------------------------------------------------------------------------
    def prepare(self, img: Tensor, channels: int = 1) -> Tensor:
        """(B, C, H, W), (C, H, W) or (H, W) -> standardised (B, channels, S, S), S = input_size."""
        if img.dim() == 2:
            img = img[None, None]
        elif img.dim() == 3:
            img = img[None]
        if img.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(img.shape)}")
        s = self.config.input_size
        if img.shape[-2:] != (s, s):
            img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False)
        img = standardise(img, self.config.norm_eps)
        if img.shape[1] != channels:
            if img.shape[1] != 1:
                raise ValueError(f"expected 1 or {channels} image channels, got {img.shape[1]}")
            img = img.expand(-1, channels, -1, -1)
        return img

    # ---- forward ------------------------------------------------------------------------------
    def features(self, xray: Tensor, drr: Tensor) -> dict[str, Tensor]:
        """Shallow features Fx, Fm and branch features Gx = G_x(Fx), Gm = G_m(Fm), Lx, Lm."""
        ch = self.config.image_channels
        x = self.prepare(xray, ch)
        m = self.prepare(drr, ch)
        if x.shape[0] != m.shape[0]:
            if x.shape[0] == 1:
                x = x.expand(m.shape[0], -1, -1, -1)
            else:
                raise ValueError(f"batch sizes differ: {x.shape[0]} X-rays, {m.shape[0]} DRRs")
        both = self.sfe(torch.cat([x, m], dim=0))  # shared weights: one pass for both images
        fx, fm = both.split(x.shape[0], dim=0)
        return {
            "Fx": fx, "Fm": fm,
            "Gx": self.global_xray(fx), "Gm": self.global_drr(fm),
            "Lx": self.local_xray(fx), "Lm": self.local_drr(fm),
        }

    def scores(self, feats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Branch scores (global, local) from the features."""
        phi_g = (feats["Gx"] - feats["Gm"]).pow(2)
        phi_l = (feats["Lx"] - feats["Lm"]).pow(2)
        return self.head_global(phi_g), self.head_local(phi_l)

    def combine(self, s_g: Tensor, s_l: Tensor) -> Tensor:
        mode = self.config.combine
        if mode == "sum":
            return s_g + s_l
        if mode == "mean":
            return 0.5 * (s_g + s_l)
        w = self.combine_weights
        return w[0] * s_g + w[1] * s_l

    def forward(self, xray: Tensor, drr: Tensor, return_features: bool = False):
        feats = self.features(xray, drr)
        score = self.combine(*self.scores(feats))
        return (score, feats) if return_features else score


class ChannelProjector(nn.Module):
    """Renders a multi-channel volume (C, K, J, I) channel by channel into (B, C, H, W) DRRs."""

    def __init__(self, volume, channels: Tensor, camera, **kwargs) -> None:
        super().__init__()
        from .projector import Projector

        self.projectors = nn.ModuleList(
            Projector(replace(volume, data=channels[i]), camera, **kwargs) for i in range(channels.shape[0])
        )
        self.camera = camera

    def forward(self, poses: Tensor) -> Tensor:
        return torch.cat([p(poses) for p in self.projectors], dim=-3)


def network_projector(net: CorrelationNet, volume, camera, **kwargs) -> nn.Module:
    """The projector whose DRRs ``net`` expects: the plain volume without a volume adapter, else
    the adapted volume (one channel for adapter_reduce='mean', three for 'per_channel'). With an
    adapter, build it anew after every weight update (it holds the adapted voxels)."""
    from .projector import Projector

    if net.adapter is None:
        return Projector(volume, camera, **kwargs)
    p = next(net.adapter.parameters())
    adapted = net.adapter(volume.data.to(device=p.device, dtype=p.dtype))
    if adapted.dim() == 3:
        return Projector(replace(volume, data=adapted), camera, **kwargs).to(p.device)
    return ChannelProjector(volume, adapted, camera, **kwargs).to(p.device)


def build_model(config: NetConfig | str = "compact", **overrides) -> CorrelationNet:
    """A fresh network from a config or a preset name."""
    cfg = NetConfig.from_preset(config, **overrides) if isinstance(config, str) else replace(config, **overrides)
    return CorrelationNet(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
