"""`mode=compress`: ComPEFT (Yadav et al., 2023), an adapter stored as a sparse ternary task vector.

An adapter's task vector is τ = θ − θ_init over its trained tensors (method parameters and head).
θ_init is not stored: training seeds right before `model.build`, and the adapter records the seed,
so seeding again and building recreates it bit for bit (a hash of it, `init_fingerprint`, proves
it at load). Per tensor, ComPEFT keeps the ceil(density·n) entries of largest |τ| and replaces each
by sign(τ)·scale, one scale per tensor:
  scale: mean  alpha · mean |τ| over the kept entries: for that support and those signs, the
               least-squares optimum (an entry with τ = 0 has no sign and is not kept);
  scale: std   alpha · std(τ) over the whole tensor (population std), the paper's choice.
No retraining. What is stored, per tensor: NAME.mask (which entries are kept, one bit each),
NAME.sign (the kept entries' signs, one bit each, 1 = positive), NAME.scale (a float32 scalar);
bits are packed 8 to a uint8, first entry in the highest bit (as numpy.packbits). Shapes come
from the rebuilt model. The method's persistent buffers (frozen projections, masks) are stored as
they are. `model.from_adapter` loads such an adapter like any other: θ = θ_init + τ̃.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.files import atomic_dir
from peftkit.merge import sources
from peftkit.methods.base import adapter_tensors
from peftkit.train import seed_everything

FORMAT = "compeft"
WEIGHTS = "adapter.compeft.safetensors"  # in place of adapter.WEIGHTS
MASK, SIGN, SCALE = ".mask", ".sign", ".scale"
SCALES = ("mean", "std")
BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans → uint8, 8 to a byte, the first in the highest bit; the last byte zero-padded."""
    bits = bits.flatten().to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8)
    return (bits * BIT_VALUES).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n booleans of `pack_bits`' output."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-n // 8):
        raise ValueError(f"expected {-(-n // 8)} packed bytes for {n} bits, got {packed.dtype} {tuple(packed.shape)}")
    return ((packed[:, None] & BIT_VALUES) != 0).flatten()[:n]


def kept_count(n: int, density: float) -> int:
    """ceil(density · n), at least 1; the rounding guards against 0.1 · 30 = 3.0000000000000004."""
    return min(n, max(1, math.ceil(round(density * n, 6)))) if n else 0


def compress_tensor(name: str, tau: torch.Tensor, density: float, alpha: float, scale: str) -> dict[str, torch.Tensor]:
    """NAME.mask, NAME.sign, NAME.scale for one tensor's τ."""
    flat = tau.detach().flatten().double()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.abs().topk(kept_count(flat.numel(), density)).indices] = True
    keep &= flat != 0
    kept = flat[keep]
    if scale == "mean":
        s = alpha * kept.abs().mean().item() if kept.numel() else 0.0
    else:
        s = alpha * flat.std(correction=0).item() if flat.numel() else 0.0
    return {name + MASK: pack_bits(keep), name + SIGN: pack_bits(kept > 0),
            name + SCALE: torch.tensor(s, dtype=torch.float32)}


def decompress_tensor(mask: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """τ̃ (float32): sign·scale where the mask is set, 0 elsewhere."""
    n = math.prod(shape)
    keep = unpack_bits(mask, n)
    positive = unpack_bits(sign, int(keep.sum()))
    if scale.dim() != 0:
        raise ValueError(f"the scale must be a scalar, got shape {tuple(scale.shape)}")
    s = scale.to(torch.float32)
    out = torch.zeros(n, dtype=torch.float32)
    out[keep] = torch.where(positive, s, -s)
    return out.view(shape)


def compress(taus: dict[str, torch.Tensor], density: float, alpha: float, scale: str) -> dict[str, torch.Tensor]:
    stored = {}
    for name, tau in taus.items():
        stored.update(compress_tensor(name, tau, density, alpha, scale))
    return stored


def decompress(stored: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """τ̃ for every name in `shapes` (the rebuilt model's), from `compress`' tensors."""
    return {n: decompress_tensor(stored[n + MASK], stored[n + SIGN], stored[n + SCALE], tuple(shape)) for n, shape in shapes.items()}


def init_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every bit of the initial tensors: the one thing a compressed adapter relies on."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def seed_init(meta: dict, where) -> None:
    """Seed as `train.run` does right before `model.build`, so that build recreates θ_init."""
    if meta.get("seed") is None:
        raise UserError(f"adapter {where} records no seed, so its initial weights cannot be rebuilt; "
                        f"retrain it with this peftkit version (adapters record their seed)")
    seed_everything(int(meta["seed"]))


def compressed_names(net: torch.nn.Module, names: list[str]) -> list[str]:
    """The trained floating tensors among an adapter's `names`; the rest (buffers) are stored dense."""
    trained = {n for n, p in net.named_parameters() if p.requires_grad and p.is_floating_point()}
    return [n for n in names if n in trained]


def initial_tensors(meta: dict, where, backbone_path: str | None) -> dict[str, torch.Tensor]:
    """θ_init of the adapter's trained tensors, rebuilt from its seed."""
    seed_init(meta, where)
    bb = OmegaConf.create(meta["backbone"])
    if backbone_path:
        bb.path = backbone_path
    a = model.build(bb, meta["method"], meta["label_names"], meta.get("task_type"))
    params = adapter_tensors(a.model)
    return {n: params[n].detach().clone() for n in compressed_names(a.model, a.trainable)}


@torch.no_grad()
def load_weights(path: Path, net: torch.nn.Module, names: list[str]) -> None:
    """`adapter.load_weights` for a compressed adapter: θ = θ_init + τ̃.

    `net` was just built after `seed_init` (`model.from_adapter`), so its trained tensors still
    hold θ_init; their fingerprint must be the one recorded when the adapter was compressed.
    """
    meta = adapter.read_config(path)
    info = meta["compression"]
    if info.get("method") != FORMAT:
        raise UserError(f"adapter {path} is compressed with '{info.get('method')}', which this peftkit cannot read; it reads {FORMAT}")
    f = Path(path) / WEIGHTS
    stored = adapter.read_tensors(f, "compressed adapter file", "compress the run again")
    params = adapter_tensors(net)
    squeezed = compressed_names(net, names)
    dense = [n for n in names if n not in squeezed]
    expected = {n + suffix for n in squeezed for suffix in (MASK, SIGN, SCALE)} | set(dense)
    missing, unexpected = sorted(expected - set(stored)), sorted(set(stored) - expected)
    if missing or unexpected:
        raise UserError(f"compressed adapter {f} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                        f"was it made from another method or backbone?")
    found = init_fingerprint({n: params[n] for n in squeezed})
    if found != info["init_fingerprint"]:
        raise UserError(f"compressed adapter {path}: the initial weights could not be rebuilt (fingerprint {found}, recorded "
                        f"{info['init_fingerprint']}), e.g. another torch or transformers version or seed; "
                        f"compress the original run again here")
    try:
        taus = decompress(stored, {n: params[n].shape for n in squeezed})
    except ValueError as e:
        raise UserError(f"corrupt compressed adapter {f}: {e}; compress the run again") from None
    for n, tau in taus.items():
        params[n].add_(tau.to(params[n].dtype))
    for n in dense:
        if params[n].shape != stored[n].shape:
            raise UserError(f"adapter {f}: {n} has shape {tuple(stored[n].shape)}, the model {tuple(params[n].shape)}")
        params[n].copy_(stored[n])


def check_knobs(cfg: DictConfig) -> tuple[float, float, str]:
    return float(cfg.density), float(cfg.alpha), str(cfg.scale)  # `schema` checked them


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    density, alpha, scale = check_knobs(cfg)
    src = sources.adapter_dir(cfg.adapter)
    meta = adapter.read_config(src)
    if "compression" in meta:
        raise UserError(f"{src} is already compressed ({meta['compression'].get('method')}); compress the original run")
    init = initial_tensors(meta, src, cfg.get("backbone_path"))
    a, meta = sources.load(src, cfg.get("backbone_path"))
    trained = adapter_tensors(a.model)
    taus = {n: trained[n].detach() - init[n] for n in init}
    stored = compress(taus, density, alpha, scale)
    stored.update({n: trained[n].detach().clone() for n in a.trainable if n not in taus})

    approx = decompress(stored, {n: t.shape for n, t in taus.items()})  # from what is written
    err = sum(((approx[n].double() - taus[n].double()) ** 2).sum().item() for n in taus)
    norm = sum((taus[n].double() ** 2).sum().item() for n in taus)
    original = nbytes({n: trained[n] for n in a.trainable})
    info = {"mode": "compress", "adapter": str(src.resolve()), "density": density, "alpha": alpha, "scale": scale,
            "original_bytes": original, "compressed_bytes": nbytes(stored), "ratio": original / nbytes(stored),
            "relative_error": math.sqrt(err / norm) if norm else 0.0,
            "tensors_compressed": len(taus), "tensors_dense": len(a.trainable) - len(taus),
            "source_metrics": meta.get("metrics", {})}
    compression = {"method": FORMAT, "density": density, "alpha": alpha, "scale": scale,
                   "init_fingerprint": init_fingerprint(init)}
    out_meta = {**meta, "compression": compression, "metrics": {}, "merge": info}  # metrics: not scored yet (peftkit eval)

    out, run_dir = Path(cfg.out), sources.run_dir(src)
    with atomic_dir(out) as tmp:
        adapter.save_tensors(tmp / "adapter", stored, out_meta, weights=WEIGHTS)
        info["original_file_bytes"] = (src / adapter.WEIGHTS).stat().st_size
        info["compressed_file_bytes"] = (tmp / "adapter" / WEIGHTS).stat().st_size
        if run_dir is not None:
            (tmp / "config.yaml").write_text((run_dir / "config.yaml").read_text())
        (tmp / "merge.json").write_text(json.dumps(info, indent=2) + "\n")
    sources.console.print(
        f"compress: {len(taus)} tensors to density {density:g} (scale {scale}, alpha {alpha:g}): "
        f"{original:,} → {info['compressed_bytes']:,} bytes ({info['ratio']:.1f}×; files {info['original_file_bytes']:,} → "
        f"{info['compressed_file_bytes']:,}), relative error ‖τ̃ − τ‖/‖τ‖ = {info['relative_error']:.4f} → {out}")
    return info
