"""srtrain.evaluate: both protocols over an image folder, model rows beside bicubic and the
degraded input, the report files, skipped unreadable images, one-line errors."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from untrained import save_checkpoint

from srtrain import evaluate
from srtrain.config import load_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "myrun" / "checkpoints" / "checkpoint_00000005"
    save_checkpoint(path, load_config(None, ["model.filters=8"]))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(2):  # smooth images, so bicubic beats the nearest-neighbour input
        x = np.linspace(0, 1, 50)
        img = np.stack([np.outer(x, x ** (i + 1)), np.outer(x[::-1], x), np.outer(x, x)], -1)
        Image.fromarray((img * 255).astype(np.uint8)).save(d / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (42, 38), np.uint8), "L").save(d / "gray.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return d


@pytest.mark.parametrize("protocol", ["standard", "seed"])
def test_reports_put_model_bicubic_and_input_side_by_side(ckpt, folder, tmp_path, protocol):
    out = tmp_path / "ev"
    rc = evaluate.main(
        [
            "--checkpoint",
            ckpt,
            ckpt,
            "--data",
            str(folder),
            "--protocol",
            protocol,
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 1  # the corrupt file was skipped, and the exit code says so
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == protocol and report["images"] == 3
    assert len(report["skipped"]) == 1 and "corrupt.jpg" in report["skipped"][0]
    methods = [r["method"] for r in report["rows"]]
    assert methods[0].startswith("myrun (base U-Net, MAE)") and len(methods) == 4
    assert methods[2:] == ["bicubic", "input (nearest)"]
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["bicubic"]["psnr"] > rows["input (nearest)"]["psnr"] > 10
    md = (out / "report.md").read_text()
    assert f"Protocol `{protocol}`" in md and "| bicubic |" in md
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(per_image) == 3 * 4 and {r["image"] for r in per_image} == {"img0", "img1", "gray"}


def test_self_ensemble_adds_a_row_per_model(ckpt, folder, tmp_path):
    args = ["--checkpoint", ckpt, "--data", str(folder), "--protocol", "seed"]
    evaluate.main([*args, "--out", str(tmp_path), "--self-ensemble", "--no-progress"])
    report = json.loads((tmp_path / "report.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert report["self_ensemble"] is True and len(methods) == 4
    assert methods[1] == f"{methods[0]}, x8 self-ensemble"
    assert methods[2:] == ["bicubic", "input (nearest)"]
    rows = report["rows"]
    assert rows[1]["checkpoint"] == ckpt and rows[1]["images"] == 3
    assert rows[0]["psnr"] != rows[1]["psnr"]


def test_standard_protocol_bicubic_row_is_the_metric_of_bicubic(ckpt, folder, tmp_path):
    from srtrain import metrics
    from srtrain.upscale import read_image

    evaluate.main(
        [
            "--checkpoint",
            ckpt,
            "--data",
            str(folder),
            "--protocol",
            "standard",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    per = {
        (r["image"], r["method"]): float(r["psnr"])
        for r in csv.DictReader((tmp_path / "per_image.csv").open())
    }
    hr = metrics.modcrop(read_image(folder / "img0.png")[0], 2)
    up = metrics.bicubic_upscale(metrics.bicubic_downscale(hr, 2)[None], 2)[0].numpy()
    assert per[("img0", "bicubic")] == pytest.approx(
        metrics.standard_metrics(up, hr, 2)[0], abs=1e-3
    )


def test_bad_inputs_are_one_line_errors(ckpt, tmp_path, capsys):
    assert (
        evaluate.main(
            ["--checkpoint", str(tmp_path / "none"), "--data", "samples", "--out", str(tmp_path)]
        )
        == 1
    )
    assert (
        evaluate.main(
            ["--checkpoint", ckpt, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
        )
        == 1
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and all(
        line.startswith("python -m srtrain.evaluate: error:") for line in err
    )


def test_sources_parse():
    assert evaluate.parse_source("s3://b/iaprtc12:test") == evaluate.Source(
        "shards", "s3://b/iaprtc12", "test"
    )
    assert evaluate.parse_source("s3://b/iaprtc12").split == "test"
    assert evaluate.parse_source("samples").split == "test"  # held out, as shards' default
    assert evaluate.parse_source("samples:val").split == "val"


def test_both_protocols_on_the_bundled_photos(ckpt, tmp_path):
    for protocol in ("standard", "seed"):
        assert (
            evaluate.main(
                [
                    "--checkpoint",
                    ckpt,
                    "--data",
                    "samples",
                    "--protocol",
                    protocol,
                    "--out",
                    str(tmp_path / protocol),
                    "--no-progress",
                ]
            )
            == 0
        )
    std = json.loads((tmp_path / "standard" / "report.json").read_text())
    seed = json.loads((tmp_path / "seed" / "report.json").read_text())
    bic = lambda r: next(x["psnr"] for x in r["rows"] if x["method"] == "bicubic")  # noqa: E731
    assert bic(std) > bic(seed) + 3  # noise-free bicubic LR on Y vs the noisy, blurred degradation


def test_a_model_is_described_by_its_architecture_and_loss():
    from srtrain.config import from_dict

    assert evaluate.describe_config(from_dict({})) == "base U-Net, MAE"
    tail = from_dict({"model": {"arch": "advanced"}, "loss": {"mse_final_fraction": 0.25}})
    assert evaluate.describe_config(tail) == "advanced U-Net, MAE, MSE for the last 25%"
