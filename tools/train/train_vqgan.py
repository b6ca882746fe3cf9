#!/usr/bin/env python3
"""Step 2: the default model's VQGAN (taming layout), trained on the shapes world.

    python tools/train/train_vqgan.py --data data/shapes --out data/runs/vqgan     # train
    python tools/train/train_vqgan.py --out data/runs/vqgan --eval                 # gate

Architecture: cm3rt's own taming-layout ``Encoder`` / ``Decoder`` (the modules
``ImageTokenizer`` runs), ch 32, ch_mult (1, 2, 2), one res block a level, mid-block
attention, z 64, 512 codes of 64 dims, f = 4: a 64 px image is 16 x 16 = 256 codes (the
plan's f = 8 failed its gate, see ``default_config``). Loss: L1 + MSE reconstruction (object
pixels weighted ``1 + --fg-weight``) + 0.25 x commitment (straight-through estimator); the
codebook follows exponential moving averages of its assigned latents (VQ-VAE-2 style; a
first run with a gradient-trained codebook collapsed to 112 of 512 codes within 200 steps),
is initialised by k-means on encoder outputs, and codes unused for ``--restart-every`` steps
are restarted from encoder outputs. Schedule: ``--images`` full 64 px images in batches of
16 (an optional first phase of ``--crops`` random 32 px crops is off by default: with f = 8
it did not transfer to full images, since GroupNorm statistics and the mid-block attention
span the whole input). No LPIPS / GAN (flat-colour shapes do not need them).

Resumable: ``<out>/checkpoint.*`` (model + EMA codebook + optimizer + code usage, no pickle) every
``--ckpt-every`` steps; rerunning the same command continues from it. Each checkpoint also
exports ``<out>/vqgan/`` with ``ImageTokenizer.save_pretrained`` (``vqgan.safetensors`` +
``vqgan_config.json``), which is what ``--eval`` and ``encode_images.py`` read.

Gate (``--eval``): on fresh renders, the analyzer must agree with the scene after a VQ round
trip (encode with cm3rt's ``vq_nearest``, decode) on >= 95% of them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from train_common import (
    Timer,
    cosine_lr,
    load_checkpoint,
    load_rgb,
    progress,
    save_checkpoint,
    setup_torch,
    split_records,
    step_rng,
    to_pixels,
)

from cm3rt.demo.shapes.vocab import IMAGE_SIZE
from cm3rt.tokenizer.vqgan import ImageTokenizer
from cm3rt.tokenizer.vqgan_config import VQGANConfig
from cm3rt.tokenizer.vqgan_modules import Decoder, Encoder

EXPORT = "vqgan"
GATE = 0.98
EVAL_TAG = 7  # seed-stream word of the gate's fresh scenes (not a make_dataset split)


def default_config(image_size: int = IMAGE_SIZE) -> VQGANConfig:
    """The shipped VQGAN: f = 8, so a 48 px image is 6 x 6 = 36 codes of a 1024 x 32 book.

    The world is built for it (``cm3rt.demo.shapes.vocab.IMAGE_SIZE``): 16 px cells are
    2 x 2 codes, objects sit centred in their cells over flat backgrounds, so an 8 px code
    only has to name one of 770 patches (background x colour x shape x size x quadrant),
    and one object gives the same codes in every cell. The first world (random sub-cell
    offsets, textured backgrounds, 64 px) needed f = 4 (256 codes) and still kept only 63%
    of scenes; an f = 8 tokenizer of that world kept 5%."""
    return VQGANConfig(resolution=image_size, base_channels=32, channel_multiplier=(1, 1, 2, 2),
                       num_res_blocks=1, attn_resolutions=(), attn_type="vanilla",
                       latent_channels=64, embed_dim=32, num_embeddings=1024)


@dataclass(frozen=True)
class VQGANOptions:
    """A training run.

    Attributes:
        data: folder written by make_dataset.py.  out: run folder.
        seed: seed of init and data order.  threads: torch intra-op threads.
        crops: 32 px crops seen in phase 1.  images: full images seen in phase 2.
        crop_batch, image_batch: batch sizes of the two phases.
        lr: peak AdamW learning rate.  beta: commitment weight.
        ckpt_every: steps between checkpoints.  restart_every: dead-code window in steps.
        fg_weight: extra reconstruction weight of object pixels (those far from the image's
            median colour, i.e. its background). Objects are ~5% of the pixels: with a plain
            mean, after 1,800 steps the autoencoder drew blurred blobs of the wrong colour
            even without quantisation (foreground L1 1.12), while backgrounds were fine.
        limit: use only the first ``limit`` training records (None: all).
        dense: share of each batch drawn on the fly as dense scenes (``dense_scene``: an
            object of any colour x shape in each cell with a per-image probability), which
            carry ~4x the object patches of a world scene (1-2 objects: ~6 of 36 codes).
    """

    data: Path
    out: Path
    seed: int = 0
    threads: int = 1
    crops: int = 0
    images: int = 12_800
    crop_batch: int = 32
    image_batch: int = 16
    lr: float = 1.5e-3
    beta: float = 0.25
    ckpt_every: int = 200
    restart_every: int = 50
    fg_weight: float = 9.0
    limit: int | None = None
    dense: float = 0.0

    def __post_init__(self) -> None:
        for name in ("crops", "images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("crop_batch", "image_batch", "ckpt_every", "restart_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    @property
    def crop_steps(self) -> int:
        return self.crops // self.crop_batch

    @property
    def total_steps(self) -> int:
        return self.crop_steps + self.images // self.image_batch


class TrainableVQGAN(nn.Module):
    """Encoder, quantiser (EMA codebook, a buffer) and decoder, with taming's names."""

    def __init__(self, cfg: VQGANConfig, decay: float = 0.99) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decay = decay
        self.register_buffer("codebook", torch.randn(cfg.num_embeddings, cfg.embed_dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(cfg.num_embeddings))
        self.register_buffer("ema_sum", self.codebook.clone())

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E, h, w] pre-quantisation latents."""
        return self.quant_conv(self.encoder(x))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Code of each row of ``flat`` [M, E] (squared L2, ties to the lower index)."""
        cb = self.codebook
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        """-> (reconstruction, commitment loss, codes [B*h*w]); in training mode the
        codebook moves towards the mean of the latents assigned to each code."""
        z = self.latents(x)
        b, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e)
        idx = self.nearest(flat.detach())
        zq = self.codebook[idx]
        commit_loss = F.mse_loss(flat, zq)
        if self.training:
            self.ema_update(flat.detach(), idx)
        zq = flat + (zq - flat).detach()  # straight-through gradient to the encoder
        zq = zq.view(b, h, w, e).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq)), commit_loss, idx

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """Move each code towards the running mean of its latents (Laplace-smoothed counts)."""
        k, d = self.cfg.num_embeddings, self.decay
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def set_codes(self, which: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite codes (init / restart), resetting their running statistics."""
        self.codebook[which] = values
        self.ema_sum[which] = values
        self.ema_count[which] = 1.0

    def to_image_tokenizer(self) -> ImageTokenizer:
        """cm3rt's ImageTokenizer sharing these modules (for save_pretrained)."""
        return ImageTokenizer(self.cfg, self.encoder, self.quant_conv,
                              self.codebook.clone(), self.post_quant_conv,
                              self.decoder)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means of rows of ``x`` [M, E] -> centres [k, E] (empty clusters reseeded)."""
    centres = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        d = x.pow(2).sum(1, keepdim=True) - 2 * x @ centres.t() + centres.pow(2).sum(1)[None]
        assign = d.argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            centres[empty] = x[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=gen)]
    return centres


class ImageSource:
    """Training images as uint8 arrays, decoded once into memory (64 px PNGs: 12 KB each)."""

    def __init__(self, data: Path, limit: int | None) -> None:
        recs = split_records(data, "train", limit)
        if not recs:
            raise ValueError(f"no training records in {data}/train.jsonl")
        self.images = np.stack([load_rgb(data, r) for r in recs])  # [N, S, S, 3]

    def batch(self, rng: np.random.Generator, n: int, crop: int | None) -> torch.Tensor:
        idx = rng.integers(0, len(self.images), n)
        imgs = self.images[idx]
        if crop is not None:
            s = imgs.shape[1]
            grid = (s - crop) // 8 + 1  # crop origins on the 8 px latent grid
            oy, ox = rng.integers(0, grid, n) * 8, rng.integers(0, grid, n) * 8
            imgs = np.stack([im[y:y + crop, x:x + crop] for im, y, x in zip(imgs, oy, ox)])
        return to_pixels(imgs)


def dense_scene(rng: np.random.Generator):
    """A tokenizer training scene: each of the 9 cells holds an object (any colour x shape,
    held-out pairs included: the tokenizer must encode the bank) with a probability drawn
    per image in [0.3, 1]; background and rendering as the default world."""
    from cm3rt.demo.shapes import Scene, SceneObject
    from cm3rt.demo.shapes.vocab import CELLS, COLOURS, SHAPES, WORLD_BACKGROUNDS

    p = rng.uniform(0.3, 1.0)
    colours, shapes = tuple(COLOURS), SHAPES
    objs = [SceneObject(shapes[int(rng.integers(len(shapes)))],
                        colours[int(rng.integers(len(colours)))],
                        ("small", "large")[int(rng.integers(2))], cell)
            for cell in CELLS if rng.random() < p]
    if not objs:
        objs = [SceneObject("circle", "red", "large", (1, 1))]
    bg = WORLD_BACKGROUNDS[int(rng.integers(len(WORLD_BACKGROUNDS)))]
    return Scene(tuple(objs), bg)


def dense_batch(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    return to_pixels(np.stack([np.asarray(dense_scene(rng).render(size)) for _ in range(n)]))


def foreground_weights(x: torch.Tensor, fg_weight: float, threshold: float = 0.5
                       ) -> torch.Tensor:
    """[B, 1, H, W] pixel weights averaging 1 per image: ``1 + fg_weight`` where the pixel
    is far (L1 over channels > ``threshold`` in [-1, 1] units) from the image's median
    colour (the background: it covers most pixels; its texture stays below the threshold)."""
    bg = x.flatten(2).median(2).values[..., None, None]
    w = 1.0 + fg_weight * ((x - bg).abs().sum(1, keepdim=True) > threshold).float()
    return w / w.mean(dim=(2, 3), keepdim=True)


def export(model: TrainableVQGAN, out: Path) -> Path:
    """Write the cm3rt-loadable VQGAN (``ImageTokenizer.save_pretrained``) to out/vqgan."""
    return model.to_image_tokenizer().save_pretrained(out / EXPORT)


def train(opts: VQGANOptions, quiet: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) training to ``opts.total_steps`` (at most ``max_steps`` more steps in
    this call); returns the last statistics."""
    setup_torch(opts.seed, opts.threads)
    timer = Timer("train_vqgan")
    cfg = default_config()
    model = TrainableVQGAN(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "options.json").write_text(
        json.dumps({**asdict(opts), "data": str(opts.data), "out": str(opts.out)}, indent=1))
    source = ImageSource(opts.data, opts.limit)
    usage = torch.zeros(cfg.num_embeddings)
    resumed = load_checkpoint(opts.out, model, opt)
    if resumed is not None:
        start, extra, _ = resumed
        usage = extra.get("usage", usage)
        print(f"resumed from {opts.out} at step {start}/{opts.total_steps}", flush=True)
    else:
        start = 0
        gen = torch.Generator().manual_seed(opts.seed)
        with torch.no_grad():
            rng = step_rng(opts.seed, 1, 0)
            z = torch.cat([model.latents(source.batch(rng, opts.crop_batch, 32))
                           .permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim) for _ in range(8)])
            model.set_codes(torch.ones(cfg.num_embeddings, dtype=torch.bool),
                            kmeans(z, cfg.num_embeddings, 10, gen))
    stats: dict = {}
    log = (opts.out / "log.jsonl").open("a", encoding="utf-8")
    t_last, s_last = timer.seconds(), start
    model.train()
    end = opts.total_steps if max_steps is None else min(opts.total_steps, start + max_steps)
    for step in progress(start, end, "vqgan", quiet):
        phase1 = step < opts.crop_steps
        rng = step_rng(opts.seed, 2, step)
        x = source.batch(rng, opts.crop_batch if phase1 else opts.image_batch,
                         32 if phase1 else None)
        n_dense = 0 if phase1 else round(opts.dense * x.shape[0])
        if n_dense:
            x = torch.cat([x[n_dense:], dense_batch(rng, n_dense, x.shape[-1])])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, opts.total_steps, opts.lr, warmup=100)
        rec, commit, idx = model(x)
        w = foreground_weights(x, opts.fg_weight)
        err = rec - x
        l1, l2 = (w * err.abs()).mean(), (w * err.pow(2)).mean()
        loss = l1 + l2 + opts.beta * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx, minlength=cfg.num_embeddings).float()
        if (step + 1) % opts.restart_every == 0:
            dead = usage == 0
            n_dead = int(dead.sum())
            if n_dead:  # restart from this batch's latents (plus a little noise)
                with torch.no_grad():
                    z = model.latents(x).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
                    g = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
                    pick = z[torch.randint(0, z.shape[0], (n_dead,), generator=g)]
                    model.set_codes(dead, pick + 0.01 * torch.randn(pick.shape, generator=g))
            stats = {"step": step + 1, "loss": loss.item(), "l1": l1.item(), "mse": l2.item(),
                     "commit": commit.item(), "dead_restarted": n_dead,
                     "codes_used": int((usage > 0).sum()), "phase": 1 if phase1 else 2,
                     "elapsed_s": round(timer.seconds(), 1)}
            log.write(json.dumps(stats) + "\n")
            log.flush()
            usage.zero_()
        if (step + 1) % opts.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(opts.out, step + 1, model, opt, {"usage": usage})
            export(model, opts.out)
            now = timer.seconds()
            rate = (step + 1 - s_last) / max(1e-9, now - t_last)
            t_last, s_last = now, step + 1
            print(f"step {step + 1}/{opts.total_steps} loss {loss.item():.4f} "
                  f"l1 {l1.item():.4f} ({rate:.3f} steps/s, "
                  f"~{(opts.total_steps - step - 1) / max(rate, 1e-9) / 3600:.2f} h left)",
                  flush=True)
    log.close()
    if start >= opts.total_steps:
        export(model, opts.out)
    timer.report()
    return stats


# ---------------------------------------------------------------------- gate
def evaluate(vqgan_dir: Path, n: int = 500, seed: int = 0) -> dict:
    """Analyzer agreement with the scene on ``n`` fresh renders, raw and after a VQ round
    trip through cm3rt's ImageTokenizer loaded from ``vqgan_dir``."""
    from cm3rt.demo.shapes import WorldConfig, sample_scene, spec_of_scene
    from cm3rt.demo.shapes.analyzer import analyze_scene, matches

    tok = ImageTokenizer.from_pretrained(vqgan_dir)
    scenes = [sample_scene(np.random.default_rng([seed, EVAL_TAG, i]), WorldConfig())
              for i in range(n)]
    images = [s.render(tok.image_size) for s in scenes]
    codes = tok.encode(images, batch_size=32)
    recon = tok.decode(codes, batch_size=32)
    raw_ok = rt_ok = 0
    sq_err = 0.0
    for scene, im, rc in zip(scenes, images, recon):
        spec = spec_of_scene(scene)
        raw_ok += matches(spec, analyze_scene(im))
        rt_ok += matches(spec, analyze_scene(rc))
        a, b = np.asarray(im, np.float64), np.asarray(rc, np.float64)
        sq_err += float(((a - b) ** 2).mean())
    mse = sq_err / n
    return {"n": n, "raw_agreement": raw_ok / n, "roundtrip_agreement": rt_ok / n,
            "psnr_db": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12))),
            "codes_used": int(torch.unique(codes).numel()), "gate": GATE,
            "passed": rt_ok / n >= GATE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--out", type=Path, default=Path("data/runs/vqgan"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--crops", type=int, default=VQGANOptions.crops)
    p.add_argument("--images", type=int, default=VQGANOptions.images)
    p.add_argument("--ckpt-every", type=int, default=VQGANOptions.ckpt_every)
    p.add_argument("--lr", type=float, default=VQGANOptions.lr)
    p.add_argument("--fg-weight", type=float, default=VQGANOptions.fg_weight)
    p.add_argument("--dense", type=float, default=VQGANOptions.dense,
                   help="share of each batch drawn as dense on-the-fly scenes (dense_scene)")
    p.add_argument("--restart-every", type=int, default=VQGANOptions.restart_every,
                   help="dead-code window in steps (codes unused that long are restarted)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this call")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 records, 4 crop steps + 2 image steps")
    p.add_argument("--eval", action="store_true", help="run the gate on <out>/vqgan")
    p.add_argument("--eval-n", type=int, default=500)
    a = p.parse_args(argv)
    if a.eval:
        timer = Timer("train_vqgan --eval")
        torch.set_num_threads(max(1, a.threads))
        vq_dir = a.out / EXPORT
        if not (vq_dir / "vqgan.safetensors").is_file():
            p.error(f"--out: no exported VQGAN at {vq_dir} (train first)")
        r = evaluate(vq_dir, 20 if a.quick else a.eval_n, a.seed)
        print(json.dumps(r))
        print(f"VQ round-trip analyzer agreement {r['roundtrip_agreement']:.3f} "
              f"(raw renders {r['raw_agreement']:.3f}, PSNR {r['psnr_db']:.1f} dB): "
              f"{'PASS' if r['passed'] else 'FAIL'} (gate {GATE})")
        timer.report()
        return 0
    try:
        if a.quick:
            opts = VQGANOptions(a.data, a.out, a.seed, a.threads, crops=4 * 8, images=2 * 4,
                                crop_batch=8, image_batch=4, ckpt_every=3, restart_every=2,
                                lr=a.lr, fg_weight=a.fg_weight, limit=64)
        else:
            opts = VQGANOptions(a.data, a.out, a.seed, a.threads, crops=a.crops,
                                images=a.images, lr=a.lr, ckpt_every=a.ckpt_every,
                                restart_every=a.restart_every, fg_weight=a.fg_weight,
                                dense=a.dense)
    except ValueError as exc:
        p.error(str(exc))
    train(opts, quiet=a.quick, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
