"""Segmentation and classification losses of the APRIL-GAN / AnomalyCLIP lineage (METHODS.md)."""

import torch
import torch.nn.functional as F


def focal_loss(state_probs: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Focal loss of 2-channel (normal, abnormal) probabilities (B, 2, H, W) against binary masks (B, H, W)."""
    target = masks.long().clamp(0, 1)
    true_class_prob = state_probs.gather(1, target.unsqueeze(1)).squeeze(1).clamp(eps, 1.0)
    return (-((1.0 - true_class_prob) ** gamma) * true_class_prob.log()).mean()


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss 1 - 2|P∩T| / (|P| + |T|), per image then averaged; ``eps`` keeps empty masks finite."""
    probs = probs.flatten(1)
    targets = targets.flatten(1).to(probs.dtype)
    overlap = (probs * targets).sum(dim=1)
    return (1.0 - (2.0 * overlap + eps) / (probs.sum(dim=1) + targets.sum(dim=1) + eps)).mean()


def segmentation_loss(state_probs: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal + Dice(abnormal, mask) + Dice(normal, 1 - mask) for one layer's (B, 2, H, W) map."""
    masks = masks.to(state_probs.dtype)
    return (
        focal_loss(state_probs, masks, gamma)
        + dice_loss(state_probs[:, 1], masks)
        + dice_loss(state_probs[:, 0], 1.0 - masks)
    )


def image_loss(state_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, 2) normal/abnormal logits against 0/1 labels."""
    return F.cross_entropy(state_logits.float(), labels.long())
