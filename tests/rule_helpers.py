"""Helpers shared by the rule tests (a module of its own: ``conftest`` names clash across test folders)."""
import torch
import torch.nn.functional as F
from torch import nn

import autoperm


def tied_sets(spec):
    """Groups as a set of frozensets of (key, axis): order-independent comparison of groupings."""
    return {frozenset((m.key, m.axis) for m in g.members) for g in spec.groups}


def spec_and_error(model, x, seed=0, train=False):
    """Infer a spec on a randomized copy of ``model`` and return (spec, invariance error)."""
    torch.manual_seed(seed)
    autoperm.randomize_(model, seed)
    model.eval()
    spec = autoperm.infer_spec(model, x)
    model.train(train)
    err = autoperm.check_invariance(model, spec, x, seed=seed)
    return spec, err


class FusedAttentionNet(nn.Module):
    """A hand-written pre-norm transformer block with a fused qkv projection (SDPA), on ``(B, T, 6)`` inputs."""

    def __init__(self, dim=16, heads=4, classes=3):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.embed, self.out = nn.Linear(6, dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.out(x.mean(1))


class GroupNet(nn.Module):
    """GroupNorm (4 groups), a grouped conv and a depthwise conv; ``shared_scale`` multiplies every group by one
    scale per within-group channel (which must keep the within-group permutation shared)."""

    def __init__(self, shared_scale=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.c3 = nn.Conv2d(32, 5, 1)
        self.shared_scale = shared_scale
        if shared_scale:
            self.s = nn.Parameter(torch.randn(1, 1, 4, 1, 1))

    def forward(self, x):
        h = self.gn(self.c1(x))
        if self.shared_scale:  # one scale per within-group channel, shared by the 4 groups
            h = (h.unflatten(1, (4, 4)) * self.s).flatten(1, 2)
        return self.c3(F.relu(self.dw(F.relu(self.c2(h)))))
