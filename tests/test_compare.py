"""srtrain.compare over two run directories: the table (markdown + CSV, with bicubic) and the
figure."""

import csv
import json

import yaml
from untrained import save_checkpoint

from srtrain import compare
from srtrain.config import load_config, to_dict


def fake_run(root, name, overrides):
    """A finished run directory as srtrain.run leaves it (untrained weights)."""
    cfg = load_config(None, ["model.filters=8", "data.val_patch_size=32", *overrides])
    run = root / name
    ck = run / "checkpoints" / "checkpoint_00000010"
    save_checkpoint(ck, cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "result.json").write_text(json.dumps({"checkpoint": str(ck), "best_epoch": 3}))
    (run / "metrics.jsonl").write_text("")
    return run


def test_table_and_figure(tmp_path):
    a = fake_run(tmp_path, "base-mae", [])
    b = fake_run(
        tmp_path,
        "adv-vgg",
        [
            "model.arch=advanced",
            "loss.kind=composite",
            "loss.alpha=0.005",
            "loss.perceptual_layers={block2_conv2: 1.0}",
        ],
    )
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b), "--out", str(out), "--no-progress"]) == 0
    md = (out / "compare.md").read_text()
    assert md.startswith("# Comparison on samples:test (2 test patches")
    assert "| base-mae | base U-Net, MAE |" in md
    assert "| adv-vgg | advanced U-Net, MAE + 0.005 x VGG block2_conv2 |" in md
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["run"] for r in rows] == ["base-mae", "adv-vgg", "bicubic"]
    for r in rows:
        assert 0 < float(r["test_mae"]) < 1 and 5 < float(r["psnr"]) < 50
    assert float(rows[2]["psnr"]) > float(rows[0]["psnr"])  # untrained models lose to bicubic
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_not_a_run_dir_is_one_line(tmp_path, capsys):
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished run directory" in err[0]


def test_split_choice_for_samples():
    assert compare.test_split(load_config(None)) == "test"  # held out from every decision
    assert compare.test_split(load_config(None, ["data.test_split=holdout"])) == "val"
    assert compare.test_split(load_config(None), "train") == "train"
