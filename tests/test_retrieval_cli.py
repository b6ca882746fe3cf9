"""`cm3rt bank build|search` through register_cli (the lead wires it into cm3rt/cli.py)."""

from __future__ import annotations

import json

import numpy as np
from retrieval_fixtures import make_tiny_clip, random_image

from cm3rt.cli import main as run
from cm3rt.retrieval.bank import MemoryBank


def test_build_then_search(tmp_path, capsys) -> None:
    cfg, w = make_tiny_clip(tmp_path / "clip", seed=11)
    src = tmp_path / "docs.jsonl"
    captions = ["a red circle", "a blue square", "a green star", "a black cat"]
    src.write_text("\n".join(json.dumps({"text": c}) for c in captions))
    out = tmp_path / "bank"
    assert run(["bank", "build", str(src), "--out", str(out), "--encoder", str(cfg),
                "--weights", str(w), "--no-progress"]) == 0
    assert "4 documents" in capsys.readouterr().out

    # Search reloads the encoder the bank records; the printed scores are the bank's.
    assert run(["bank", "search", str(out), "a green star", "-k", "4", "--max-score", "1.1",
                "--dedupe", "1.1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    with MemoryBank.open(out) as bank:
        want = bank.search(text="a green star", k=4, max_score=None, dedupe=None)
    for line, doc in zip(lines, want):
        fields = line.split(maxsplit=4)
        assert int(fields[0]) == doc.id
        assert abs(float(fields[1]) - doc.score) < 1e-4
        assert fields[4] == doc.caption
    assert lines[0].endswith("a green star")  # its own caption is the nearest document

    # Rebuilding resumes: nothing new to add.
    assert run(["bank", "build", str(src), "--out", str(out), "--encoder", str(cfg),
                "--weights", str(w), "--no-progress"]) == 0
    assert "4 documents" in capsys.readouterr().out


def test_errors_are_readable(tmp_path, capsys) -> None:
    cfg, w = make_tiny_clip(tmp_path / "clip", seed=12)
    src = tmp_path / "imgs"
    src.mkdir()
    random_image(np.random.default_rng(0)).save(src / "a.png")
    code = run(["bank", "build", str(src), "--out", str(tmp_path / "bank"), "--encoder",
                str(cfg), "--weights", str(w), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "without an image tokenizer" in err
    assert not (tmp_path / "bank").exists()  # a failed first build leaves nothing behind
    assert run(["bank", "search", str(tmp_path / "nope"), "q"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run(["bank", "build", str(src), "--out", str(tmp_path / "b2"), "--encoder",
                str(cfg), "--no-progress"]) == 1
    assert "weights" in capsys.readouterr().err
