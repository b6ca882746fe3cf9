"""Smoke test of tools/train/copy_diagnostic.py (issue 12's copying diagnostic) on the
shipped default model and a small fresh bank split: the per-pair banks hold exactly the
documents that show their pair ("right") or the next pair and not theirs ("wrong"), and the
four columns are scored on the same prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "train"))
DEFAULT = REPO / "cm3rt" / "assets" / "default"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    pytest.importorskip("open_clip")
    pytest.importorskip("faiss")
    if not (DEFAULT / "bank").is_dir():
        pytest.skip("the default model's assets are not in this checkout")
    import make_dataset

    root = tmp_path_factory.mktemp("copy") / "shapes"
    # every fourth bank scene shows a held-out pair first: 160 scenes cover all 8 pairs
    make_dataset.make_dataset(make_dataset.DatasetOptions(root, seed=7, train=8, bank=160,
                                                          eval=2, novel=0))
    return root


def test_pair_banks_hold_only_their_pair(data, tmp_path):
    import copy_diagnostic
    from train_common import split_records

    from cm3rt.demo.shapes.vocab import HELD_OUT_PAIRS
    from cm3rt.retrieval.bank import open_cached

    banks = copy_diagnostic.pair_banks(data, DEFAULT, DEFAULT / "clip", tmp_path)
    assert set(banks) == {"right", "wrong"}
    assert set(banks["right"]) == set(banks["wrong"]) == set(HELD_OUT_PAIRS)
    recs = split_records(data, "bank")

    def shows(r, pair):
        return any((o["colour"], o["shape"]) == pair for o in r["scene"]["objects"])

    for pair in HELD_OUT_PAIRS:
        wrong = copy_diagnostic.WRONG_OF[pair]
        assert wrong != pair and wrong in HELD_OUT_PAIRS
        for column, keep in (("right", lambda r, p=pair: shows(r, p)),
                             ("wrong", lambda r, p=pair, w=wrong: shows(r, w)
                              and not shows(r, p))):
            want = sorted(r["text"] for r in recs if keep(r))
            bank = open_cached(banks[column][pair])
            got = sorted(d.caption for d in bank.get(range(len(bank))))
            assert got == want and want, (column, pair)


def test_diagnostic_scores_four_columns(data, tmp_path):
    import copy_diagnostic

    out = tmp_path / "copy"
    assert copy_diagnostic.main(["--model", str(DEFAULT), "--data", str(data), "--out",
                                 str(out), "--prompts", "4"]) == 0
    result = json.loads((out / "copy_diagnostic.json").read_text())
    shipped = json.loads((DEFAULT / "defaults.json").read_text())["k_docs"]
    assert result["n"] == 4 and result["guidance"] == "cdk" and result["k_docs"] == shipped
    for column in ("none", "bank", "right", "wrong"):
        cell = result[column]
        assert 0 <= cell["passed"] <= 4 and cell["rate"] == cell["passed"] / 4
        lo, hi = cell["ci95"]
        assert 0.0 <= lo <= cell["rate"] <= hi <= 1.0


def test_diagnostic_needs_documents(tmp_path, capsys):
    import copy_diagnostic

    with pytest.raises(SystemExit):
        copy_diagnostic.main(["--out", str(tmp_path), "-k", "0"])
    assert "--k-docs must be >= 1" in capsys.readouterr().err
