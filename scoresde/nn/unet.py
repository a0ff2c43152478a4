"""The eps-UNet of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B).

Residual blocks (GroupNorm -> SiLU -> 3x3 conv, plus a projection of the time/class embedding,
GroupNorm -> SiLU -> dropout -> 3x3 conv), `num_res_blocks` of them per resolution, self-attention
at the chosen resolutions and in the middle, stride-2 convolutions down, nearest-neighbour + conv
up, and skip connections concatenated on the way up. With base 128, multipliers (1, 2, 2, 2), two
blocks per level and attention at 16x16 this is Ho et al.'s 35.7M-parameter CIFAR-10 network.

Initialisation follows Ho et al.: Xavier-uniform (fan-average) weights, zero biases, and zero for
the layer that closes every residual branch (second conv of a block, attention output) and for the
output conv. A fresh network therefore outputs exactly zero, and each residual block starts as
the identity; gradients reach every parameter after the first optimizer steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import (
    Conditioning,
    check_dropout,
    check_int,
    check_num_classes,
    check_positive,
    check_t_y,
    check_time_embedding,
)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _zero(module: nn.Module) -> nn.Module:
    """Mark the layer that closes a residual branch (or the network) to be zero-initialised."""
    module._zero_init = True
    return module


class ResBlock(nn.Module):
    """x + F(x, emb), with a 1x1 conv on the skip path when the width changes."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, cin)
        self.conv1 = _conv3x3(cin, cout)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(num_groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(_conv3x3(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """x + proj(softmax(q k^T / sqrt(d)) v) over the H*W positions, `num_heads` heads of width d."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, d)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.Module):
    """A residual block, followed by self-attention at the resolutions that have it."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res, self.attn = res, attn if attn is not None else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _as_ints(name: str, values, allow_empty: bool = False) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name}={values!r}: expected a sequence of ints")
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{name}={values!r}: expected at least one int")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={values!r}: expected a sequence of ints >= 1")
    return values


class UNet(nn.Module):
    """eps-network on images: forward(x, t, y=None) -> a tensor of x's shape.

    x: (batch, in_channels, image_size, image_size); t: (batch,) continuous times in [0, 1] (or a
    scalar, shared by the batch); y: (batch,) integer labels in [0, num_classes] for a conditional
    network, `num_classes` being the null class; y=None uses the null class for every sample.
    Labels outside that range fail in the embedding lookup (they are not checked: that would
    need a device sync).

    Image conditioning (super-resolution, Saharia et al. 2021 SR3): with `cond_channels` > 0 the
    network also takes `cond`, a (batch, cond_channels, cond_size, cond_size) low-resolution image,
    upsampled bilinearly (align_corners=False) to image_size and concatenated to x as extra input
    channels, and `cond_t`, the (batch,) noise level s in [0, 1] of that image's noise-conditioning
    augmentation (Ho et al. 2022; default 0, a clean image), embedded like t and added to the
    time embedding.
    """

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int | None = None,
                 base_channels: int = 128, channel_mults=(1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions=(16,), dropout: float = 0.1, num_classes: int | None = None,
                 time_embedding: str = "sinusoidal", time_scale: float = 1000.0, num_groups: int = 32,
                 num_heads: int = 1, cond_channels: int = 0, cond_size: int | None = None):
        super().__init__()
        mults = _as_ints("channel_mults", channel_mults)
        attn_res = _as_ints("attention_resolutions", attention_resolutions, allow_empty=True)
        self.config = dict(
            architecture="UNet", image_size=check_int("image_size", image_size),
            in_channels=check_int("in_channels", in_channels),
            out_channels=in_channels if out_channels is None else check_int("out_channels", out_channels),
            base_channels=check_int("base_channels", base_channels), channel_mults=mults,
            num_res_blocks=check_int("num_res_blocks", num_res_blocks), attention_resolutions=attn_res,
            dropout=check_dropout(dropout), num_classes=check_num_classes(num_classes),
            time_embedding=check_time_embedding(time_embedding),
            time_scale=check_positive("time_scale", time_scale), num_groups=check_int("num_groups", num_groups),
            num_heads=check_int("num_heads", num_heads))
        _check_geometry(self.config)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.cond_channels = check_int("cond_channels", cond_channels, minimum=0)
        self.cond_size = None
        if self.cond_channels:  # kept out of an unconditioned network's config: old configs stay equal
            self.cond_size = check_int("cond_size", cond_size if cond_size is not None else image_size)
            if self.cond_size > image_size:
                raise ValueError(f"cond_size={self.cond_size}: expected at most image_size={image_size} (the "
                                 "conditioning image is upsampled to the output size)")
            self.config.update(cond_channels=self.cond_channels, cond_size=self.cond_size)
        self._build(**{k: v for k, v in self.config.items() if k not in ("architecture", "cond_channels",
                                                                          "cond_size")})
        self._init_weights()

    def _build(self, *, image_size, in_channels, out_channels, base_channels, channel_mults, num_res_blocks,
               attention_resolutions, dropout, num_classes, time_embedding, time_scale, num_groups, num_heads):
        emb_dim = 4 * base_channels
        self.cond = Conditioning(base_channels, emb_dim, kind=time_embedding, time_scale=time_scale,
                                 num_classes=num_classes)
        block = lambda cin, cout, res: Block(
            ResBlock(cin, cout, emb_dim, dropout, num_groups),
            AttnBlock(cout, num_heads, num_groups) if res in attention_resolutions else None)

        if self.cond_channels:  # the augmentation level s of the conditioning image, embedded like t
            self.cond_level = Conditioning(base_channels, emb_dim, kind=time_embedding, time_scale=time_scale)
        self.conv_in = _conv3x3(in_channels + self.cond_channels, base_channels)
        ch, res, skips = base_channels, image_size, [base_channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult, res))
                ch = base_channels * mult
                skips.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([Block(ResBlock(ch, ch, emb_dim, dropout, num_groups),
                                        AttnBlock(ch, num_heads, num_groups)),
                                  Block(ResBlock(ch, ch, emb_dim, dropout, num_groups), None)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), base_channels * mult, res))
                ch = base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = nn.GroupNorm(num_groups, ch)
        self.conv_out = _zero(_conv3x3(ch, out_channels))

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if getattr(m, "_zero_init", False):
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, cond_t: torch.Tensor | float | None = None) -> torch.Tensor:
        self._check_x(x)
        t, y = check_t_y(t, y, x.shape[0], self.num_classes, x.device)
        emb = self.cond(t, y)
        if self.cond_channels:
            self._check_cond(cond, x)
            level, _ = check_t_y(0.0 if cond_t is None else cond_t, None, x.shape[0], None, x.device)
            emb = emb + self.cond_level(level, None)
            up = F.interpolate(cond.to(x.dtype), size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False)
            x = torch.cat([x, up], dim=1)
        elif cond is not None:
            raise ValueError("cond: this network takes no conditioning image (cond_channels=0); pass cond=None")
        h = self.conv_in(x)
        hs = [h]
        for module in self.down:
            h = module(h, emb)
            hs.append(h)
        for module in self.mid:
            h = module(h, emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_x(self, x):
        want = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor of shape (batch, {', '.join(map(str, want))}), got "
                            + (f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__))
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected shape (batch, {', '.join(map(str, want))}) (in_channels="
                             f"{self.in_channels}, image_size={self.image_size}), got {tuple(x.shape)}")


    def _check_cond(self, cond, x):
        want = (self.cond_channels, self.cond_size, self.cond_size)
        shape = f"({x.shape[0]}, {', '.join(map(str, want))})"
        if cond is None:
            raise ValueError(f"cond=None: this network is conditioned on a low-resolution image; expected a "
                             f"tensor of shape {shape} (cond_channels={self.cond_channels}, cond_size="
                             f"{self.cond_size}), e.g. Denoiser(net, sde, cond=low_res)")
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
            raise TypeError(f"cond: expected a floating tensor of shape {shape}, got "
                            + (f"a {cond.dtype} tensor" if isinstance(cond, torch.Tensor) else type(cond).__name__))
        if tuple(cond.shape) != (x.shape[0], *want):
            raise ValueError(f"cond: expected shape {shape} (batch, cond_channels={self.cond_channels}, "
                             f"cond_size={self.cond_size}, cond_size), got {tuple(cond.shape)}")


def _check_geometry(c: dict):
    """Resolutions, attention levels, group and head counts that fit together."""
    levels = len(c["channel_mults"])
    factor = 2 ** (levels - 1)
    if c["image_size"] % factor:
        raise ValueError(f"image_size={c['image_size']}: must be divisible by 2**(len(channel_mults) - 1) = "
                         f"{factor} for channel_mults={c['channel_mults']}")
    reachable = [c["image_size"] // 2**i for i in range(levels)]
    bad = [r for r in c["attention_resolutions"] if r not in reachable]
    if bad:
        raise ValueError(f"attention_resolutions={c['attention_resolutions']}: {bad} not among the network's "
                         f"resolutions {reachable}")
    widths = sorted({c["base_channels"]} | {c["base_channels"] * m for m in c["channel_mults"]})
    if any(w % c["num_groups"] for w in widths):
        raise ValueError(f"num_groups={c['num_groups']}: must divide every channel count {widths} "
                         f"(base_channels x channel_mults)")
    attended = {c["base_channels"] * c["channel_mults"][-1]} | {
        c["base_channels"] * c["channel_mults"][reachable.index(r)] for r in c["attention_resolutions"]}
    if any(w % c["num_heads"] for w in attended):
        raise ValueError(f"num_heads={c['num_heads']}: must divide the channel count of every attention "
                         f"layer {sorted(attended)}")
