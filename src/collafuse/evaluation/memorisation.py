"""Does a model copy its training images? Three measures on the same samples as FID (issue 28, item 6).

- **copy share**: the share of samples whose nearest training image (pixel L2) is much nearer than the second
  nearest, d1 / d2 < 1/3: the criterion of Carlini et al. 2023 ("Extracting training data from diffusion models")
  as used by Gu et al. 2023 ("On memorization in diffusion models", arXiv 2310.02664, Section 3). A fresh sample
  lies about as far from its nearest as from its second-nearest training image; a copy sits on one of them.
- **nearest-neighbour ratio**: the median over samples of d(sample, nearest training image) divided by
  d(sample, nearest image of an equal-size held-out set). Near 1: the samples are as close to images the model
  never saw as to the ones it trained on (no copying); well below 1: they sit on the training set. Equal sizes
  matter: the nearest of more images is nearer, whatever the model learnt.
- FID against the client's own training images beside FID against its held-out images is reported by
  `collafuse.evaluation.fidelity` (``vs_train`` and ``vs_test``); a memorising model scores the first far lower.
"""

from __future__ import annotations

import torch

# Carlini et al. 2023 / Gu et al. 2023: a sample is a copy when its nearest training image is nearer than a third of
# the distance to the second nearest.
COPY_RATIO = 1.0 / 3.0


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, k: int = 2, chunk: int = 256) -> torch.Tensor:
    """Pixel-space L2 distances from each query to its ``k`` nearest references, ascending: [n_queries, k].

    Args:
        queries (`torch.Tensor`): [N, ...] images (any shape after the first axis; flattened).
        references (`torch.Tensor`): [M, ...] images of the same shape, M >= k.
        k (`int`, defaults to 2): how many nearest distances to return.
        chunk (`int`, defaults to 256): queries per block (bounds memory at chunk x M distances).

    Computed in float64 from ||q||^2 + ||r||^2 - 2 q.r, so an exact copy comes out at 0 (to 1e-6), not at the
    float32 cancellation error of two large squared norms.
    """
    if references.shape[0] < k:
        raise ValueError(f"references = {references.shape[0]} images is invalid (allowed: at least k = {k})")
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"queries of shape {tuple(queries.shape[1:])} and references of shape "
                         f"{tuple(references.shape[1:])} differ (allowed: images of one shape)")
    r = references.reshape(len(references), -1).double()
    r_sq = r.pow(2).sum(1)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].reshape(-1, r.shape[1]).double()
        d2 = (q.pow(2).sum(1, keepdim=True) + r_sq[None, :] - 2 * q @ r.T).clamp_min(0)
        out.append(d2.topk(k, dim=1, largest=False).values.sqrt())
    return torch.cat(out).float()


def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, seed: int = 0) -> dict:
    """The copy share and the nearest-neighbour ratio of ``samples`` against a client's ``train`` images and its
    ``heldout`` images (see the module docstring).

    Args:
        samples (`torch.Tensor`): [N, C, H, W] generated images in the model range [-1, 1].
        train (`torch.Tensor`): [M, C, H, W] every training image of the client (the copy share uses all of them).
        heldout (`torch.Tensor`): [L, C, H, W] images the model never trained on.
        seed (`int`, defaults to 0): draws the equal-size subsets for the ratio (m = min(M, L) of each).

    Returns:
        `dict`: ``copy_share`` (in [0, 1]), ``copy_ratio_threshold`` (1/3), ``nn_ratio_median`` and its quartiles,
        and the sizes compared.
    """
    if len(samples) == 0:
        raise ValueError("samples = 0 images is invalid (allowed: at least one generated image)")
    d_train = nearest_distances(samples, train, k=2)
    ratio12 = d_train[:, 0] / d_train[:, 1].clamp_min(1e-12)
    m = min(len(train), len(heldout))
    if m < 1:
        raise ValueError("heldout = 0 images is invalid (allowed: at least one held-out image)")
    g = torch.Generator().manual_seed(seed)
    train_m = train[torch.randperm(len(train), generator=g)[:m]]
    heldout_m = heldout[torch.randperm(len(heldout), generator=g)[:m]]
    nn_train = nearest_distances(samples, train_m, k=1)[:, 0]
    nn_heldout = nearest_distances(samples, heldout_m, k=1)[:, 0]
    ratio = nn_train / nn_heldout.clamp_min(1e-12)
    q = torch.quantile(ratio.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {
        "copy_share": float((ratio12 < COPY_RATIO).float().mean()),
        "copy_ratio_threshold": COPY_RATIO,
        "nn_ratio_median": q[1],
        "nn_ratio_quartiles": [q[0], q[2]],
        "n_samples": len(samples),
        "n_train": len(train),
        "n_compared_each": m,
    }
