"""``cm3rt convert vqgan``: a Lightning-style vqgan.ckpt + taming vqgan.yaml -> safetensors."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
import torch
from model_fixtures import make_tiny_model_dir
from safetensors.torch import load_file

from cm3rt.cli.convert import register_cli
from cm3rt.tokenizer import ImageTokenizer
from cm3rt.tokenizer.convert import convert_vqgan

YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {embed}
    n_embed: {n_embed}
    ckpt_path: /checkpoint/vqgan/last.ckpt
    ddconfig:
      double_z: false
      z_channels: {z}
      resolution: {res}
      in_channels: 3
      out_ch: 3
      ch: {ch}
      ch_mult: [1, 2, 2]
      num_res_blocks: 1
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 10000
"""


class _Payload:
    """An object whose unpickling would create a file: weights_only must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A model directory and the 'original' Chameleon-style files made from its VQGAN."""
    root = tmp_path_factory.mktemp("convert")
    model_dir = make_tiny_model_dir(root)
    sd = dict(load_file(model_dir / "vqgan.safetensors"))
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    ckpt = root / "vqgan.ckpt"
    torch.save({"state_dict": sd, "epoch": 7, "global_step": 123456,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}, ckpt)
    yaml_path = root / "vqgan.yaml"
    yaml_path.write_text(YAML.format(embed=8, n_embed=64, z=8, res=16, ch=32))
    return model_dir, ckpt, yaml_path


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cm3rt")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_convert_roundtrip(original, tmp_path):
    model_dir, ckpt, yaml_path = original
    out = tmp_path / "out"
    assert _cli(["convert", "vqgan", "--ckpt", str(ckpt), "--config", str(yaml_path),
                 "--out", str(out)]) == 0
    written = load_file(out / "vqgan.safetensors")
    reference = load_file(model_dir / "vqgan.safetensors")
    assert set(written) == set(reference)  # loss.* dropped, nothing else lost
    for name, t in reference.items():
        assert torch.equal(written[name], t), name
    cfg = json.loads((out / "vqgan_config.json").read_text())
    assert cfg["num_embeddings"] == 64 and cfg["channel_multiplier"] == [1, 2, 2]
    converted = ImageTokenizer.from_pretrained(out)
    ours = ImageTokenizer.from_pretrained(model_dir)
    assert converted.identity() == ours.identity() and converted.has_decoder
    with pytest.raises(ValueError, match="exists"):
        convert_vqgan(ckpt, yaml_path, out)
    convert_vqgan(ckpt, yaml_path, out, overwrite=True)


def test_convert_refuses_pickled_objects(original, tmp_path):
    model_dir, _, yaml_path = original
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    sd = dict(load_file(model_dir / "vqgan.safetensors"))
    torch.save({"state_dict": sd, "callbacks": _Payload(str(marker))}, bad)
    with pytest.raises(ValueError, match="weights-only"):
        convert_vqgan(bad, yaml_path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "vqgan.safetensors").exists()


def test_convert_checks_shapes_against_yaml(original, tmp_path):
    _, ckpt, _ = original
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(YAML.format(embed=8, n_embed=128, z=8, res=16, ch=32))
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight.*\[64, 8\].*\[128, 8\]"):
        convert_vqgan(ckpt, wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        convert_vqgan(tmp_path / "none.ckpt", wrong, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--config"):
        convert_vqgan(ckpt, tmp_path / "none.yaml", tmp_path / "out")
    (tmp_path / "junk.yaml").write_text("model: {params: {embed_dim: 3}}")
    with pytest.raises(ValueError, match="ddconfig"):
        convert_vqgan(ckpt, tmp_path / "junk.yaml", tmp_path / "out")


def test_cli_wiring(original, tmp_path, capsys):
    """Through the real `cm3rt` entry point: success prints the output, errors are one line."""
    cli = pytest.importorskip("cm3rt.cli")
    _, ckpt, yaml_path = original
    out = tmp_path / "via_cli"
    assert cli.main(["convert", "vqgan", "--ckpt", str(ckpt), "--config", str(yaml_path),
                     "--out", str(out)]) == 0
    assert "vqgan.safetensors" in capsys.readouterr().out
    assert cli.main(["convert", "vqgan", "--ckpt", str(tmp_path / "nope.ckpt"),
                     "--config", str(yaml_path), "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "nope.ckpt" in err and "Traceback" not in err
