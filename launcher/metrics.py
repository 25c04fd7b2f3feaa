"""Monitoring: routing figures reduced once per logged step, metrics.jsonl and TensorBoard.

Every rank accumulates the same keys (the competition schedule is identical everywhere), so the
one all-reduce per logged step is entered by all ranks and never hangs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from competesmoe.moe.layer import MoEAux
from competesmoe.moe.routing import WEIGHTED
from competesmoe.parallel import collectives


class RoutingStats:
    """Sums each MoE layer's figures over the micro-batches of the steps since the last report, on the
    compute device (no host sync until `reduce`).

    A weighted auxiliary loss term ('weighted_<term>', moe.routing.WEIGHTED) is kept as its share of the same
    micro-batch's LM loss, '<term>_to_lm': how much of the training signal the term carries.
    """

    def __init__(self):
        self.sums: list[dict[str, torch.Tensor]] = []
        self.counts: list[dict[str, int]] = []

    def add(self, moe_aux: list[MoEAux], lm_loss: torch.Tensor) -> None:
        if not self.sums:
            self.sums = [{} for _ in moe_aux]
            self.counts = [{} for _ in moe_aux]
        lm_loss = lm_loss.detach().float()
        for sums, counts, aux in zip(self.sums, self.counts, moe_aux):
            for key, value in aux.stats.items():
                value = value.detach().float()
                if key.startswith(WEIGHTED):
                    key, value = f"{key[len(WEIGHTED):]}_to_lm", value / lm_loss
                sums[key] = sums[key] + value if key in sums else value.clone()
                counts[key] = counts.get(key, 0) + 1

    def reduce(self, group: dist.ProcessGroup | None, device: torch.device) -> list[dict[str, float | list[float]]]:
        """Mean over micro-batches and ranks (one all-reduce on `device`, the compute device the figures are on, and
        one host copy); resets the accumulator."""
        keys = [sorted(s) for s in self.sums]
        flat = [self.sums[i][k].reshape(-1) / self.counts[i][k] for i, ks in enumerate(keys) for k in ks]
        if not flat:
            return []
        buffer = torch.cat(flat)
        if dist.is_initialized():
            collectives.all_reduce_(buffer, device, group=group)
            buffer /= dist.get_world_size(group)
        values = buffer.tolist()
        layers, offset = [], 0
        for i, ks in enumerate(keys):
            layer = {}
            for k in ks:
                n = self.sums[i][k].numel()
                layer[k] = values[offset:offset + n] if self.sums[i][k].dim() > 0 else values[offset]
                offset += n
            layers.append(layer)
        self.sums, self.counts = [], []
        return layers


HEATMAP_STEPS = 256  # logged steps (columns) one heatmap shows, the latest ones
# viridis at 0, 1/4, 1/2, 3/4, 1: dark purple = no tokens, teal = an even share, yellow = twice that or more
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def expert_load_heatmap(columns: list[list[float]], cell_height: int = 12, width: int = 512) -> np.ndarray:
    """RGB uint8 image (H, W, 3): row e is expert e, column t the t-th logged step, colour its share.

    The colour scale is relative to an even split (1/E in the middle of it, 2/E and more brightest),
    so a balanced router is an even teal field and a collapsed one a single bright row on dark purple.
    """
    load = np.asarray(columns, dtype=np.float64).T  # (experts, steps)
    experts, steps = load.shape
    level = np.clip(load * experts / 2.0, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(level.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (level - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac  # (experts, steps, 3)
    cell_width = max(1, width // max(steps, 1))
    image = np.repeat(np.repeat(rgb, cell_height, axis=0), cell_width, axis=1)
    return np.rint(image).astype(np.uint8)


class MetricsWriter:
    """metrics.jsonl plus TensorBoard scalars and histograms; only rank 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict, moe_layers: list[dict] | None = None) -> None:
        if not self.enabled:
            return
        step, split = record["step"], record["split"]
        if moe_layers:
            record = {**record, "moe": moe_layers}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(f"{split}/{key}", value, step)
        for index, layer in enumerate(moe_layers or []):
            for key, value in layer.items():
                if isinstance(value, list):
                    for expert, share in enumerate(value):
                        self.tb.add_scalar(f"moe/layer{index}/{key}/expert{expert}", share, step)
                    self._expert_histogram(f"moe/layer{index}/{key}", value, step)
                else:
                    self.tb.add_scalar(f"moe/layer{index}/{key}", value, step)
        if moe_layers:
            self._expert_load_images(moe_layers, step)

    def _expert_load_images(self, moe_layers: list[dict], step: int) -> None:
        """Per layer, an image of tokens per expert (rows) over the logged steps (columns) so far."""
        history = self.__dict__.setdefault("_load_history", {})
        for index, layer in enumerate(moe_layers):
            shares = layer.get("expert_fraction")
            if not isinstance(shares, list):
                continue
            columns = history.setdefault(index, [])
            columns.append(shares)
            del columns[:-HEATMAP_STEPS]
            self.tb.add_image(f"moe/layer{index}/expert_load_heatmap", expert_load_heatmap(columns), step,
                              dataformats="HWC")

    def _expert_histogram(self, tag: str, shares: list[float], step: int) -> None:
        """A histogram whose bins are the experts and whose heights are their shares of tokens."""
        experts = torch.arange(len(shares), dtype=torch.float64, device="cpu")
        weights = torch.tensor(shares, dtype=torch.float64, device="cpu")
        self.tb.add_histogram_raw(tag, min=0.0, max=float(len(shares) - 1), num=float(weights.sum()),
                                  sum=float((experts * weights).sum()), sum_squares=float((experts**2 * weights).sum()),
                                  bucket_limits=(experts + 0.5).tolist(), bucket_counts=shares, global_step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
