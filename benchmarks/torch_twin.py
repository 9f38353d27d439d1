"""The same U-Net as jaxdiff.nets.unet.textbook_unet() (default settings), its training step and its
1000-step CFG DDPM sampler, written in PyTorch for side-by-side speed measurements."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) or 1, ch, eps=1e-6)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.cond_mlp = nn.Linear(cond_dim, cin)
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, padding=1), group_norm(cout)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, padding=1), group_norm(cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, cond):
        h = x + self.cond_mlp(F.silu(cond))[:, :, None, None]
        h = F.silu(self.norm1(self.conv1(h)))
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    def __init__(self, num_classes=10, channels=(64, 128, 256), cond_dim=256, in_ch=1):
        super().__init__()
        self.cond_dim = cond_dim
        self.t1, self.t2 = nn.Linear(cond_dim, cond_dim), nn.Linear(cond_dim, cond_dim)
        self.embed = nn.Embedding(num_classes + 1, cond_dim)
        self.stem = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = channels[0]
        for ch in channels:
            self.down.append(ConvBlock(cin, ch, cond_dim))
            cin = ch
        self.up = nn.ModuleList()
        for level in reversed(range(len(channels) - 1)):
            self.up.append(ConvBlock(cin + channels[level], channels[level], cond_dim))
            cin = channels[level]
        self.out = nn.Conv2d(cin, in_ch, 1)

    def forward(self, x, t, y):
        cond = self.t2(F.silu(self.t1(sinusoidal(t, self.cond_dim)))) + self.embed(y)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, cond)
            if i < len(self.down) - 1:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1), cond)
        return self.out(h.float() if h.dtype != torch.float32 else h)


def linear_alpha_bars(T: int, device):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return betas.float().to(device), torch.cumprod(1 - betas, 0).float().to(device)


def make_train_step(model, opt, T: int, p_uncond=0.1, bf16=False, num_classes=10, ema_decay=0.999):
    """One step of jaxdiff's work: eps-MSE with label dropout, global-norm clipping, Adam, EMA."""
    params = [p for p in model.parameters()]
    betas, abar = linear_alpha_bars(T, params[0].device)
    ema = [p.detach().clone() for p in params]

    def step(x0, y):
        t = torch.randint(1, T + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        y = torch.where(torch.rand(y.shape, device=y.device) < p_uncond, torch.full_like(y, num_classes), y)
        a = abar[t - 1][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x_t, t, y).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
        return loss

    return step


@torch.no_grad()
def cfg_ddpm_sample(model, labels, gamma: float, T: int, bf16=False, num_classes=10, channels_last=False):
    """The textbook's ancestral sampler with classifier-free guidance in one doubled batch per step."""
    device = labels.device
    betas, abar = linear_alpha_bars(T, device)
    n = labels.shape[0]
    x = torch.randn(n, 1, 28, 28, device=device)
    y2 = torch.cat([labels, torch.full_like(labels, num_classes)])
    for t in range(T, 0, -1):
        tt = torch.full((2 * n,), t, device=device, dtype=torch.long)
        x2 = torch.cat([x, x])
        if channels_last:
            x2 = x2.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            e = model(x2, tt, y2).float()
        eps = e[n:] + gamma * (e[:n] - e[n:])
        beta, a = betas[t - 1], abar[t - 1]
        x = (x - beta / (1 - a).sqrt() * eps) / (1 - beta).sqrt()
        if t > 1:
            x = x + beta.sqrt() * torch.randn_like(x)
    return x
