#!/usr/bin/env python3
"""Step 2: the default model's image tokenizer (taming-layout VQ autoencoder), trained on
the shapes world with one code per cell content.

    python tools/train/train_vqgan.py --out data/runs/vqgan            # train
    python tools/train/train_vqgan.py --out data/runs/vqgan --eval     # gate

Architecture: cm3rt's own taming-layout ``Encoder`` / ``Decoder`` (the modules
``ImageTokenizer`` runs), ch 32, ch_mult (1, 1, 2, 2, 4), one res block a level, z 64,
f = 16: a 48 px image is 3 x 3 = 9 codes, one per cell of the world's grid, from a book of
``cells.NUM_CELL_CODES`` (194) codes of 32 dims.

Why supervised codes. The world is built so that a cell holds one of 194 contents
(background x empty-or-colour x shape x size, ``cm3rt.demo.shapes.cells``). The first
tokenizer learnt its own code assignment (EMA code book, k-means init, dead-code restarts;
f = 8, 1024 codes): its GroupNorm statistics span the whole image, so the same cell content
got a different code in every context: 3.9 nats of codes per content, which the decoder LM
had to spend its budget guessing. Here the renderer's labels fix the assignment: the
encoder's latent of a cell is trained (cross-entropy over negative squared distances to the
code book, so the nearest code is the predicted one, exactly what ``vq_nearest`` computes at
inference) to land on its content's code, and the decoder is trained to draw each cell from
its content's code vector. The result is still an ordinary VQGAN checkpoint: any image
encodes by nearest code, any code sequence decodes.

Loss: cross-entropy of the code assignment + L1 + MSE reconstruction from the true codes
(object pixels weighted ``1 + --fg-weight``). A second phase (``--decoder-images``) then
trains only the pixel decoder (``post_quant_conv`` + ``decoder``) on the now fixed code book:
codes and encoder stay exactly as phase 1 left them, and a step costs no encoder pass. (The
joint phase learns the code assignment in ~400 steps, 99% of cells, but the pixel decoder
far more slowly, chasing a moving code book.) Data: scenes drawn on the fly (pure functions
of seed and step), a ``--dense`` share of them with an object of any colour x shape in
each cell, the rest from the world (``WorldConfig()``, held-out pairs included: the
tokenizer must encode the memory bank; only the decoder LM never sees them).

Resumable: ``<out>/checkpoint.*`` (model + optimizer, no pickle) every ``--ckpt-every``
steps; rerunning the same command continues from it. Each checkpoint also exports
``<out>/vqgan/`` with ``ImageTokenizer.save_pretrained`` (``vqgan.safetensors`` +
``vqgan_config.json``), which is what ``--eval`` and ``encode_images.py`` read.

Gate (``--eval``): on fresh renders, the analyzer must agree with the scene after a VQ round
trip (encode with cm3rt's ``vq_nearest``, decode) on >= 98% of them; it also reports the
share of cells encoded to their content's code.
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
    progress,
    save_checkpoint,
    setup_torch,
    step_rng,
    to_pixels,
)

from cm3rt.demo.shapes.cells import CODES_PER_IMAGE, NUM_CELL_CODES, scene_codes
from cm3rt.demo.shapes.vocab import IMAGE_SIZE
from cm3rt.tokenizer.vqgan import ImageTokenizer
from cm3rt.tokenizer.vqgan_config import VQGANConfig
from cm3rt.tokenizer.vqgan_modules import Decoder, Encoder

EXPORT = "vqgan"
GATE = 0.98
EVAL_TAG = 7  # seed-stream word of the gate's fresh scenes (not a make_dataset split)
BATCH_TAG = 2  # seed-stream word of the training batches


def default_config(image_size: int = IMAGE_SIZE) -> VQGANConfig:
    """The shipped tokenizer: f = 16, so a 48 px image is 3 x 3 = 9 codes, one per cell."""
    return VQGANConfig(resolution=image_size, base_channels=32,
                       channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=1,
                       attn_resolutions=(), attn_type="vanilla", latent_channels=64,
                       embed_dim=32, num_embeddings=NUM_CELL_CODES)


@dataclass(frozen=True)
class VQGANOptions:
    """A training run.

    Attributes:
        out: run folder.  seed: seed of init and data.  threads: torch intra-op threads.
        images: scenes of phase 1 (encoder, code book and decoder).  batch: scenes a step.
        decoder_images: scenes of phase 2 (pixel decoder only, code book fixed).
        lr: peak AdamW learning rate of each phase (its own cosine schedule).
        cls_weight: weight of the code-assignment loss.
        ckpt_every: steps between checkpoints.
        fg_weight: extra reconstruction weight of object pixels (those far from the image's
            median colour, i.e. its background; objects are a few % of the pixels).
        dense: share of each batch drawn as dense scenes (``dense_scene``), which carry ~4x
            the object cells of a world scene.
    """

    out: Path
    seed: int = 0
    threads: int = 1
    images: int = 48_000
    decoder_images: int = 0
    batch: int = 32
    lr: float = 2e-3
    cls_weight: float = 1.0
    ckpt_every: int = 200
    fg_weight: float = 9.0
    dense: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.decoder_images, int) or self.decoder_images < 0:
            raise ValueError(f"decoder_images must be an int >= 0, got {self.decoder_images!r}")
        for name in ("images", "batch", "ckpt_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.dense <= 1.0:
            raise ValueError(f"dense must be in [0, 1], got {self.dense!r}")

    @property
    def joint_steps(self) -> int:
        return max(1, self.images // self.batch)

    @property
    def total_steps(self) -> int:
        return self.joint_steps + self.decoder_images // self.batch


class TrainableVQGAN(nn.Module):
    """Encoder, code book (a parameter) and decoder, with taming's names."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.codebook = nn.Parameter(torch.randn(cfg.num_embeddings, cfg.embed_dim))

    def code_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B * h * w, K] negative squared distances of each latent cell to
        each code (their argmax is the nearest code, what inference picks)."""
        z = self.quant_conv(self.encoder(x))
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        cb = self.codebook
        return -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None])

    def draw(self, codes: torch.Tensor, side: int, train_codebook: bool = True) -> torch.Tensor:
        """Codes [B, side * side] -> pixels [B, 3, H, W]."""
        cb = self.codebook if train_codebook else self.codebook.detach()
        zq = cb[codes].view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq))

    def to_image_tokenizer(self) -> ImageTokenizer:
        """cm3rt's ImageTokenizer sharing these modules (for save_pretrained)."""
        return ImageTokenizer(self.cfg, self.encoder, self.quant_conv,
                              self.codebook.detach().clone(), self.post_quant_conv,
                              self.decoder)


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


def training_batch(rng: np.random.Generator, n: int, dense: float, size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [n, 3, size, size], true codes [n, 9]) of ``n`` fresh scenes."""
    from cm3rt.demo.shapes import WorldConfig, sample_scene

    world = WorldConfig()
    scenes = [dense_scene(rng) if rng.random() < dense else sample_scene(rng, world)
              for _ in range(n)]
    pixels = to_pixels(np.stack([np.asarray(s.render(size)) for s in scenes]))
    return pixels, torch.tensor([scene_codes(s) for s in scenes], dtype=torch.long)


def foreground_weights(x: torch.Tensor, fg_weight: float, threshold: float = 0.5
                       ) -> torch.Tensor:
    """[B, 1, H, W] pixel weights averaging 1 per image: ``1 + fg_weight`` where the pixel
    is far (L1 over channels > ``threshold`` in [-1, 1] units) from the image's median
    colour (the background: it covers most pixels)."""
    bg = x.flatten(2).median(2).values[..., None, None]
    w = 1.0 + fg_weight * ((x - bg).abs().sum(1, keepdim=True) > threshold).float()
    return w / w.mean(dim=(2, 3), keepdim=True)


def export(model: TrainableVQGAN, out: Path) -> Path:
    """Write the cm3rt-loadable VQGAN (``ImageTokenizer.save_pretrained``) to out/vqgan."""
    return model.to_image_tokenizer().save_pretrained(out / EXPORT)


def train(opts: VQGANOptions, quiet: bool = False, max_steps: int | None = None,
          config: VQGANConfig | None = None) -> dict:
    """Run (or resume) training to ``opts.total_steps`` (at most ``max_steps`` more steps in
    this call); returns the last statistics."""
    setup_torch(opts.seed, opts.threads)
    timer = Timer("train_vqgan")
    cfg = config or default_config()
    side = cfg.latent_size
    model = TrainableVQGAN(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "options.json").write_text(json.dumps({**asdict(opts), "out": str(opts.out)},
                                                      indent=1))
    resumed = load_checkpoint(opts.out, model, opt)
    start = 0
    if resumed is not None:
        start = resumed[0]
        print(f"resumed from {opts.out} at step {start}/{opts.total_steps}", flush=True)
    stats: dict = {}
    log = (opts.out / "log.jsonl").open("a", encoding="utf-8")
    t_last, s_last = timer.seconds(), start
    model.train()
    end = opts.total_steps if max_steps is None else min(opts.total_steps, start + max_steps)
    hits = cells = 0
    for step in progress(start, end, "vqgan", quiet):
        x, codes = training_batch(step_rng(opts.seed, BATCH_TAG, step), opts.batch,
                                  opts.dense, cfg.resolution)
        joint = step < opts.joint_steps
        for g in opt.param_groups:
            g["lr"] = (cosine_lr(step, opts.joint_steps, opts.lr, warmup=100) if joint else
                       cosine_lr(step - opts.joint_steps, opts.total_steps - opts.joint_steps,
                                 opts.lr, warmup=50))
        rec = model.draw(codes, side, train_codebook=joint)
        w = foreground_weights(x, opts.fg_weight)
        err = rec - x
        l1, l2 = (w * err.abs()).mean(), (w * err.pow(2)).mean()
        loss = l1 + l2
        if joint:
            logits = model.code_logits(x)
            cls = F.cross_entropy(logits, codes.reshape(-1))
            loss = loss + opts.cls_weight * cls
            hits += int((logits.argmax(1) == codes.reshape(-1)).sum())
            cells += codes.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # phase 2: encoder and code book have no gradient, AdamW skips them
        if (step + 1) % 50 == 0 or step + 1 == end:
            stats = {"step": step + 1, "phase": 1 if joint else 2, "loss": loss.item(),
                     "l1": l1.item(), "mse": l2.item(), "elapsed_s": round(timer.seconds(), 1)}
            if cells:
                stats.update(cls=cls.item(), code_accuracy=round(hits / cells, 5))
            log.write(json.dumps(stats) + "\n")
            log.flush()
            hits = cells = 0
        if (step + 1) % opts.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(opts.out, step + 1, model, opt)
            export(model, opts.out)
            now = timer.seconds()
            rate = (step + 1 - s_last) / max(1e-9, now - t_last)
            t_last, s_last = now, step + 1
            print(f"step {step + 1}/{opts.total_steps} loss {loss.item():.4f} "
                  f"l1 {l1.item():.4f} codes {stats.get('code_accuracy')} ({rate:.3f} steps/s, "
                  f"~{(opts.total_steps - step - 1) / max(rate, 1e-9) / 3600:.2f} h left)",
                  flush=True)
    log.close()
    if start >= opts.total_steps:
        export(model, opts.out)
    timer.report()
    return stats


# ---------------------------------------------------------------------- gate
def evaluate(vqgan_dir: Path, n: int = 500, seed: int = 0) -> dict:
    """On ``n`` fresh world renders (any colour x shape): analyzer agreement with the scene,
    raw and after a VQ round trip through cm3rt's ImageTokenizer loaded from ``vqgan_dir``,
    and the share of cells encoded to their content's code (``cells.scene_codes``)."""
    from cm3rt.demo.shapes import WorldConfig, sample_scene, spec_of_scene
    from cm3rt.demo.shapes.analyzer import analyze_scene, matches

    tok = ImageTokenizer.from_pretrained(vqgan_dir)
    scenes = [sample_scene(np.random.default_rng([seed, EVAL_TAG, i]), WorldConfig())
              for i in range(n)]
    images = [s.render(tok.image_size) for s in scenes]
    codes = tok.encode(images, batch_size=32)
    recon = tok.decode(codes, batch_size=32)
    truth = torch.tensor([scene_codes(s) for s in scenes]) if (
        tok.num_tokens == CODES_PER_IMAGE and tok.codebook_size == NUM_CELL_CODES) else None
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
            "code_agreement": (None if truth is None
                               else float((codes.long() == truth).float().mean())),
            "psnr_db": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12))),
            "codes_used": int(torch.unique(codes).numel()), "gate": GATE,
            "passed": rt_ok / n >= GATE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/runs/vqgan"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=VQGANOptions.images,
                   help="scenes of phase 1 (encoder, code book and decoder)")
    p.add_argument("--decoder-images", type=int, default=VQGANOptions.decoder_images,
                   help="scenes of phase 2 (pixel decoder only, on the fixed code book)")
    p.add_argument("--batch", type=int, default=VQGANOptions.batch)
    p.add_argument("--ckpt-every", type=int, default=VQGANOptions.ckpt_every)
    p.add_argument("--lr", type=float, default=VQGANOptions.lr)
    p.add_argument("--fg-weight", type=float, default=VQGANOptions.fg_weight)
    p.add_argument("--dense", type=float, default=VQGANOptions.dense,
                   help="share of each batch drawn as dense scenes (dense_scene)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this call")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 + 2 steps of 4 scenes")
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
              f"(raw renders {r['raw_agreement']:.3f}, cells on their code "
              f"{r['code_agreement']}, PSNR {r['psnr_db']:.1f} dB): "
              f"{'PASS' if r['passed'] else 'FAIL'} (gate {GATE})")
        timer.report()
        return 0
    try:
        if a.quick:
            opts = VQGANOptions(a.out, a.seed, a.threads, images=4 * 4, decoder_images=2 * 4,
                                batch=4, ckpt_every=3, lr=a.lr, fg_weight=a.fg_weight,
                                dense=a.dense)
        else:
            opts = VQGANOptions(a.out, a.seed, a.threads, images=a.images,
                                decoder_images=a.decoder_images, batch=a.batch,
                                lr=a.lr, ckpt_every=a.ckpt_every, fg_weight=a.fg_weight,
                                dense=a.dense)
    except ValueError as exc:
        p.error(str(exc))
    train(opts, quiet=a.quick, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
