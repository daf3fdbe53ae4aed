"""How pages are stored: in the model dtype, or as fp8 (e4m3) codes with one power-of-two scale
per layer, KV head and K/V. The host pool, NVMe and the GPU page cache hold the same bytes; the
element-wise encode/decode are the kernels' (lcrun.kernels.tiered_reference), this module keeps
the scales and applies them to whole pages."""
from __future__ import annotations

import torch

from lcrun.errors import ConfigError
from lcrun.kernels.tiered_reference import FP8_MAX
from lcrun.kernels.tiered_reference import decode as decode_codes
from lcrun.kernels.tiered_reference import encode as encode_codes

FP8 = torch.float8_e4m3fn

# One scale per layer, KV head and K/V, set from the first prompt's largest magnitude times this
# headroom (later tokens up to that size keep e4m3's 3 mantissa bits; larger ones saturate at
# +-448 codes). e4m3 spans 2^15 between its smallest normal and its largest value, so the headroom
# costs nothing that matters: values below ~1/3500 of the largest key or value of a head round to
# the subnormal grid.
FP8_HEADROOM = 8.0


def fp8_scales(amax: torch.Tensor) -> torch.Tensor:
    """(..., 2) largest |K|, |V| -> (..., 4) [K scale, V scale, 1 / K scale, 1 / V scale]: powers of
    two, so encoding (x * inverse) and decoding (code * scale) are exact multiplications."""
    scale = torch.exp2(torch.ceil(torch.log2((amax.float() * FP8_HEADROOM / FP8_MAX).clamp(min=2.0 ** -20))))
    return torch.cat((scale, 1.0 / scale), dim=-1)


class PageCodec:
    """Pages of ``page_size`` tokens x ``head_dim``, K and V, stored as ``store_dtype``: the model
    dtype (a cast) or FP8 with ``kv_scale`` (L, Hkv, 4) fp32 [K scale, V scale, 1/K, 1/V] (None
    for model-dtype pages), set when position 0 of a layer is written."""

    def __init__(self, num_layers: int, num_kv_heads: int, page_size: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, store_dtype: torch.dtype | None):
        store = dtype if store_dtype is None else store_dtype
        if store not in (dtype, FP8):
            raise ConfigError(f"KV pages are stored in the model dtype ({dtype}) or fp8 (e4m3), not {store}")
        if store == FP8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError(f"fp8 KV pages need a GPU with fp8 conversions (compute capability 8.9+: RTX 40xx, "
                              f"L4, H100); {torch.cuda.get_device_name(device)} has "
                              f"{torch.cuda.get_device_capability(device)}: use --kv-dtype auto")
        self.dtype, self.store_dtype = dtype, store
        self.page_shape = (2, page_size, head_dim)
        self.page_bytes = 2 * page_size * head_dim * torch.tensor([], dtype=store).element_size()
        self.kv_scale = (torch.ones((num_layers, num_kv_heads, 4), device=device, dtype=torch.float32)
                         if store == FP8 else None)

    @property
    def name(self) -> str:
        return str(self.store_dtype).replace("torch.", "")

    def scales(self, layer: int) -> torch.Tensor | None:
        """The layer's (Hkv, 4) fp8 scales, or None when pages are stored in the model dtype."""
        return None if self.kv_scale is None else self.kv_scale[layer]

    def set_scales(self, layer: int, k: torch.Tensor, v: torch.Tensor, token_dim: int) -> None:
        """fp8 pages: the layer's scales from the first K/V written at position 0 (tokens along
        ``token_dim``, KV heads along the other leading dim, D last)."""
        if self.kv_scale is None:
            return
        dims = (token_dim, 2)

        def largest(x: torch.Tensor) -> torch.Tensor:  # max |x| without an |x| copy (a whole layer at 512K)
            return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))
        amax = torch.stack((largest(k), largest(v)), dim=-1)  # (Hkv, 2)
        self.kv_scale[layer].copy_(fp8_scales(amax))

    def to_bytes(self, pages: torch.Tensor, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """(n, 2, P, D) pages in the model dtype of KV ``heads`` (n,) -> (n, page_bytes) uint8 storage."""
        scale = self.scales(layer)
        codes = encode_codes(pages, None if scale is None else scale[heads, 2:, None, None], self.store_dtype)
        return codes.reshape(pages.shape[0], -1).view(torch.uint8)

    def from_bytes(self, rows: torch.Tensor, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """(n, >= page_bytes) uint8 storage rows (a host slot's padding past page_bytes is dropped)
        of KV ``heads`` (n,) -> (n, 2, P, D) pages in the model dtype."""
        pages = rows[:, :self.page_bytes].view(self.store_dtype).view(-1, *self.page_shape)
        scale = self.scales(layer)
        return decode_codes(pages, None if scale is None else scale[heads, :2, None, None], self.dtype)
